"""The README says what mpbook does: its tables are produced from what mpbook reads."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_the_architecture_table_is_what_mpbook_reads():
    from mpbook.models import architecture_table

    text = README.read_text()
    block = re.search(r"<summary>families x strategies</summary>\n\n(.*?)\n\n</details>", text, re.S)
    assert block, "the README lost its families x strategies table"
    assert block.group(1).strip() == architecture_table().strip(), (
        "the README's table differs from mpbook.models.architecture_table(): paste its output again"
    )


def test_the_readme_has_exactly_two_commands_for_a_newcomer():
    text = README.read_text()
    head = text.split("## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", head, re.S)
    assert commands == [
        'pip install torch==2.13.0 && pip install -e ".[test]" && python -m mpbook demo',
        "python -m pytest",
    ]
