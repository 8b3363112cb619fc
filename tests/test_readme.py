"""The README says what mpbook does: its tables are produced from what mpbook reads and measures
(the families table: tests/test_conformance.py)."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_has_exactly_two_commands_for_a_newcomer():
    text = README.read_text()
    head = text.split("## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", head, re.S)
    assert commands == [
        'pip install torch==2.13.0 && pip install -e ".[test]" && python -m mpbook demo',
        "python -m pytest",
    ]
