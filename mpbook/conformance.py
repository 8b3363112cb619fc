"""Which strategies run which families, measured: ``python -m mpbook conformance``.

For every causal-LM model type transformers ships, a tiny random checkpoint built from a
shrunk copy of the family's default config (:mod:`mpbook.models.shrink`, nothing named per
family) is saved with ``save_pretrained``; then each strategy runs on one cluster of CPU engines
as a person would run it (``Workbench.forward`` and ``generate``, loading the folder through
``from_pretrained`` on the engines), and its logits and greedy tokens are held against one
device (:func:`mpbook.reference.reference`, plain transformers). Each cell says:

- ``yes``: the layout ran and gave one device's logits (atol 1e-3, see TOLERANCE) and tokens;
- ``refused: why``: mpbook said no before any engine worked (the model has no plan for it, its
  layers keep a recurrent state...);
- ``fails: why``: it ran and broke, or gave other logits or tokens: a defect.

A family whose tiny checkpoint cannot be built or run by plain transformers has no cells; its
row says why. On 2 engines the columns are data, pipeline, tensor and expert parallel; on 4,
the combinations tp=2 x pp=2 and tp=2 x ep=2. The README's families table is
:func:`markdown` of the committed report (``--json``, then ``--readme``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Different lengths on purpose: left padding and positions must be right for every row, and
# the long ones overflow the tiny configs' 4-token windows.
PROMPTS = ("Explain pipeline parallelism in one sentence.", "Hi", "What does an all-reduce do?")
NEW_TOKENS = 4
# The tests' tolerance is 1e-4; linear-attention kernels (Qwen3.5's gated delta rule) chunk a
# batch padded otherwise differently and were measured 2.3e-4 off: float noise, where a broken
# layout is off by whole units. Greedy tokens must be equal all the same.
TOLERANCE = 1e-3
MAX_PARAMETERS = 10_000_000  # a tiny checkpoint; more means a size the shrinking missed
# column -> (strategy, degrees beyond the strategy's own), by the cluster's engine count
COLUMNS: dict[int, dict[str, tuple[str, dict]]] = {
    2: {"data": ("data", {}), "pipeline": ("pipeline", {}), "tensor": ("tensor", {}), "expert": ("expert", {})},
    4: {"tp x pp": ("tensor", {"pp": 2}), "tp x ep": ("tensor", {"ep": 2})},
}
REPORT = Path(__file__).resolve().parents[1] / "docs" / "conformance.json"
BEGIN, END = "<!-- conformance table: begin -->", "<!-- conformance table: end -->"


@dataclass
class Cell:
    status: str  # "yes", "refused", "fails"
    reason: str = ""
    seconds: float = 0.0

    def short(self) -> str:
        if self.status == "yes":
            return "yes"
        return f"{self.status}: {_first_clause(self.reason)}"


@dataclass
class Row:
    model_type: str
    engines: int
    cells: dict[str, Cell] = field(default_factory=dict)
    not_built: str = ""  # why there are no cells: the tiny checkpoint could not be built or run
    parameters: int = 0
    seconds: float = 0.0


@dataclass
class Report:
    transformers: str
    torch: str
    date: str
    seconds: float
    rows: list[Row]

    def counts(self) -> dict[str, int]:
        out = {"yes": 0, "refused": 0, "fails": 0, "not built": 0}
        for row in self.rows:
            if row.not_built:
                out["not built"] += 1
            for cell in row.cells.values():
                out[cell.status] += 1
        return out

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> Report:
        data = json.loads(text)
        rows = [Row(**{**r, "cells": {k: Cell(**c) for k, c in r["cells"].items()}}) for r in data.pop("rows")]
        return cls(**data, rows=rows)

    @classmethod
    def merged(cls, reports: Sequence[Report]) -> Report:
        """Several sweeps (2 engines, a 4-engine sample, types measured again) as one: each
        type's cells together, a later report's cell replacing an earlier one's. Its time is
        the longest sweep's of each engine count, added up (a sweep of a few types measured
        again does not add to the whole sweep's time)."""
        rows: dict[str, Row] = {}
        longest: dict[int, float] = {}
        for report in reports:
            engines = report.rows[0].engines if report.rows else 0
            longest[engines] = max(longest.get(engines, 0.0), report.seconds)
            for row in report.rows:
                if row.model_type not in rows or row.not_built or rows[row.model_type].not_built:
                    rows[row.model_type] = dataclasses.replace(row, cells=dict(row.cells))
                else:
                    rows[row.model_type].cells.update(row.cells)
        first = reports[0]
        return cls(first.transformers, first.torch, max(r.date for r in reports),
                   round(sum(longest.values()), 1), sorted(rows.values(), key=lambda r: r.model_type))


# ----------------------------------------------------------------------------- which types
def causal_lm_types() -> list[str]:
    """Every model type transformers maps to a causal-LM class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def rotating_sample(types: Sequence[str], count: int, *, day: int | None = None) -> list[str]:
    """``count`` of ``types``, a different slice each day (by the day's ordinal), so that every
    type comes round within ``len(types) / count`` days."""
    day = datetime.date.today().toordinal() if day is None else day
    types = sorted(types)
    start = (day * count) % len(types)
    return [types[(start + i) % len(types)] for i in range(min(count, len(types)))]


# ----------------------------------------------------------------------------- the sweep
def sweep(types: Sequence[str] | None = None, *, engines: int = 2, wb=None,
          on_row: Callable[[Row], None] | None = None, remeasure: bool = False) -> Report:
    """Build each type's tiny checkpoint and run every column for ``engines`` on one cluster
    (``wb``, else one started here for the whole sweep). ``remeasure``: run the layouts mpbook
    refuses because an earlier sweep measured them failing (mpbook.models.support)."""
    import contextlib

    import torch
    import transformers

    from .models.support import measured_refusals_lifted

    from .workbench import Workbench

    if engines not in COLUMNS:
        raise _error(f"--engines {engines}: the sweep runs on 2 engines (data, pipeline, tensor, expert) or 4 "
                     "(tp x pp, tp x ep); choose 2 or 4")
    known = causal_lm_types()
    types = list(types) if types else known
    unknown = [t for t in types if t not in known]
    if unknown:
        raise _error(f"--types: {', '.join(unknown)} is not a causal-LM model type of transformers "
                     f"{transformers.__version__}; choose among {', '.join(known[:5])} ... ({len(known)} in all)")
    began = time.perf_counter()
    owned = wb is None
    # Tiny models: a collective that waits 20 s waits for a rank that failed.
    wb = Workbench.start(engines, cpu=True, timeout_s=20) if owned else wb
    if wb.world_size != engines:
        raise _error(f"the cluster has {wb.world_size} engines; the {engines}-engine columns need {engines}")
    rows = []
    root = Path(tempfile.mkdtemp(prefix="mpbook-conformance-"))
    try:
        for model_type in types:
            with measured_refusals_lifted() if remeasure else contextlib.nullcontext():
                row = check_type(wb, model_type, root, engines=engines)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if owned:
            wb.stop()
    return Report(transformers=transformers.__version__, torch=torch.__version__,
                  date=datetime.date.today().isoformat(), seconds=round(time.perf_counter() - began, 1), rows=rows)


def check_type(wb, model_type: str, root: Path, *, engines: int = 2) -> Row:
    """One type's row: its checkpoint built, the reference run, each column run and compared."""
    from .reference import reference

    began = time.perf_counter()
    row = Row(model_type, engines)
    folder = root / model_type
    try:
        row.parameters = build_checkpoint(model_type, folder, engines=engines)
        want_logits, want_tokens = _quiet(reference, str(folder), list(PROMPTS), max_new_tokens=NEW_TOKENS)
        want_tokens = _quiet(own_positions_greedy, folder, want_tokens)
        if not all(bool(l.isfinite().all()) for l in want_logits):
            raise ValueError("one device's logits are not finite")
    except Exception as exc:  # noqa: BLE001  transformers cannot build or run this family's tiny model
        row.not_built = _one_line(exc)
        row.seconds = round(time.perf_counter() - began, 1)
        shutil.rmtree(folder, ignore_errors=True)
        return row
    for column, (strategy, degrees) in COLUMNS[engines].items():
        row.cells[column] = run_cell(wb, str(folder), strategy, degrees, want_logits, want_tokens)
    shutil.rmtree(folder, ignore_errors=True)
    row.seconds = round(time.perf_counter() - began, 1)
    return row


def build_checkpoint(model_type: str, folder: Path, *, engines: int = 2) -> int:
    """The type's tiny random checkpoint saved to ``folder`` with the presets' tokenizer;
    returns its parameter count."""
    from .models.presets import save_random
    from .models.shrink import shrink_config
    from .models.structure import meta_model

    config = _quiet(shrink_config, model_type, engines=engines)
    on_meta = _quiet(meta_model, config)
    count = sum(p.numel() for p in on_meta.parameters())
    if count > MAX_PARAMETERS:  # sizes named in ways shrink_config does not know
        raise ValueError(f"the shrunk config still makes {count / 1e6:.0f} M parameters")
    _quiet(save_random, config, folder, seed=0)
    return count


def own_positions_greedy(folder: Path, generated: list[list[int]]) -> list[list[int]]:
    """``generate``'s greedy tokens, unless the model numbers its positions itself from an
    offset (RoBERTa's family: from its padding index + 1), where ``generate`` gives positions
    from 0 and so disagrees with the family's own forward (measured: data2vec-text's first token
    108 by generate, 115 by its forward of the prompt alone). Then each prompt's tokens from the
    model's own forward alone, with its cache, as many as ``generate`` made for it. The
    prompts are encoded as :func:`mpbook.reference.reference` encodes them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from .models.loading import position_offset

    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if not position_offset(lm):
        return generated
    tokenizer = AutoTokenizer.from_pretrained(folder)
    out = []
    with torch.inference_mode():
        for prompt, made in zip(PROMPTS, generated):
            if tokenizer.chat_template:
                ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                    return_dict=True, return_tensors="pt")["input_ids"]
            else:
                ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            cache = DynamicCache(config=lm.config)  # filled in place
            step = lm(input_ids=ids, cache=cache, use_cache=True)
            new = []
            for _ in made:
                new.append(int(step.logits[0, -1].argmax()))
                step = lm(input_ids=torch.tensor([[new[-1]]]), cache=cache, use_cache=True)
            out.append(new)
    return out


def run_cell(wb, folder: str, strategy: str, degrees: dict, want_logits, want_tokens) -> Cell:
    """A forward pass and a greedy generation with one layout, against one device."""
    import torch

    from .errors import MpbookError, RankError

    began = time.perf_counter()

    def done(status: str, reason: str = "") -> Cell:
        return Cell(status, reason, round(time.perf_counter() - began, 2))

    try:
        forward = wb.forward(list(PROMPTS), strategy=strategy, model=folder, microbatches=1, **degrees)
        for i, (got, want) in enumerate(zip(forward.logits, want_logits)):
            try:
                torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=TOLERANCE)
            except AssertionError as exc:
                return done("fails", f"prompt {i}'s logits differ from one device's ({_mismatch(exc)})")
        generated = wb.generate(list(PROMPTS), strategy=strategy, model=folder, max_new_tokens=NEW_TOKENS, **degrees)
        if generated.token_ids != want_tokens:
            return done("fails", f"greedy tokens {generated.token_ids} where one device gives {want_tokens}")
        return done("yes")
    except RankError as exc:
        _heal(wb)
        return done("fails", f"on the engines: {_one_line(exc)}")
    except MpbookError as exc:  # said on the client before any engine worked
        return done("refused", str(exc))
    except Exception as exc:  # noqa: BLE001  the client broke: a defect, not a refusal
        _heal(wb)
        return done("fails", f"on the client: {type(exc).__name__}: {_one_line(exc)}")


def _heal(wb) -> None:
    """After a failed run: the process group whole again, or the engines restarted."""
    try:
        wb.cluster.check_running("the next cell")
        if wb.apply(_all_reduce, stream=False) == [float(sum(range(1, wb.world_size + 1)))] * wb.world_size:
            return
    except Exception:  # noqa: BLE001  a broken group or a dead engine: start again
        pass
    wb.restart()


def _all_reduce(state):
    import torch
    import torch.distributed as dist

    t = torch.tensor([state.rank + 1.0])
    dist.all_reduce(t)
    return t.item()


# ----------------------------------------------------------------------------- the report
def summary(report: Report) -> str:
    counts = report.counts()
    return (f"transformers {report.transformers}, torch {report.torch}, {report.date}: {len(report.rows)} model types "
            f"in {report.seconds / 60:.1f} min; cells: {counts['yes']} yes, {counts['refused']} refused, "
            f"{counts['fails']} fails; {counts['not built']} types not built")


def row_line(row: Row) -> str:
    if row.not_built:
        return f"{row.model_type:<28} not built: {row.not_built}  ({row.seconds:.1f} s)"
    cells = "  ".join(f"{k}={c.short()}" for k, c in row.cells.items())
    return f"{row.model_type:<28} {cells}  ({row.seconds:.1f} s)"


def markdown(report: Report) -> str:
    """The README's families table: one row per type, a column per layout run."""
    columns = [c for engines in sorted(COLUMNS) for c in COLUMNS[engines]
               if any(c in row.cells for row in report.rows)]
    counts = report.counts()
    lines = [
        f"Measured {report.date} with transformers {report.transformers} and torch {report.torch} "
        f"(`python -m mpbook conformance`, {len(report.rows)} model types in {report.seconds / 60:.0f} min "
        f"on 2 CPU cores): {counts['yes']} cells yes, {counts['refused']} refused, {counts['fails']} fail; "
        f"{counts['not built']} types whose tiny checkpoint transformers could not build or run.",
        "",
        "| `model_type` | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for row in report.rows:
        if row.not_built:
            cells = [f"not built: {_cell_text(row.not_built)}"] + [""] * (len(columns) - 1)
        else:
            cells = [_cell_text(_shorter(row.cells[c].short(), row.model_type)) if c in row.cells else ""
                     for c in columns]
        lines.append(f"| `{row.model_type}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_readme(readme: Path, report: Report) -> None:
    """Replace the README's table between its markers with :func:`markdown` of ``report``."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise _error(f"{readme} has no {BEGIN} ... {END} markers; add them where the table goes")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{markdown(report)}\n{END}{tail}")


def readme_table(readme: Path) -> str:
    text = readme.read_text()
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip() if BEGIN in text else ""


# ----------------------------------------------------------------------------- helpers
def _first_clause(reason: str) -> str:
    """A refusal's own clause, without the advice after it (the layouts that would run)."""
    return reason.split("; ", 1)[0]


def _shorter(text: str, model_type: str) -> str:
    """A cell as the table says it: without the degree (the column says it) and the type's own
    name (the row says it)."""
    import re

    text = re.sub(r"^(refused|fails): (?:(?:dp|pp|tp|ep)=\d+: )?", r"\1: ", text)
    for name in sorted({model_type, model_type.replace("-", "_")}, key=len, reverse=True):
        text = text.replace(f"{name}'s ", "its ").replace(f"{name}: ", "").replace(f"{name} has ", "")
    return text


def _cell_text(text: str) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 200 else text[:197] + "..."


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _mismatch(exc: AssertionError) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if "Greatest absolute difference" in line]
    return lines[0] if lines else _one_line(exc)


def _quiet(fn, *args, **kwargs):
    """transformers' warnings about a random model's defaults are not the sweep's business."""
    import warnings

    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(before)


def _error(message: str):
    from .errors import MpbookError

    return MpbookError(message)


# ----------------------------------------------------------------------------- the command
def add_command(commands) -> None:
    """``python -m mpbook conformance``, registered on the command line's subparsers."""
    c = commands.add_parser("conformance", help="every causal-LM family x strategy, run on engines against one device")
    c.add_argument("--types", default=None, metavar="T,...",
                   help="model types to check (default: every causal-LM type transformers ships)")
    c.add_argument("--engines", type=int, default=2, choices=sorted(COLUMNS),
                   help="2: data, pipeline, tensor, expert; 4: tp=2 x pp=2 and tp=2 x ep=2 (default 2)")
    c.add_argument("--remeasure", action="store_true",
                   help="also run the layouts mpbook refuses because a sweep measured them failing")
    c.add_argument("--json", default=None, metavar="PATH", help="write the report to PATH")
    c.add_argument("--readme", default=None, metavar="README",
                   help="write the families table into README (between its markers)")
    c.add_argument("--from", dest="reports", nargs="+", default=None, metavar="JSON",
                   help="no sweep: merge these reports (e.g. a 2-engine sweep and a 4-engine sample) for --readme")
    c.set_defaults(func=command)


def command(args) -> int:
    if args.reports:
        report = Report.merged([Report.from_json(Path(p).read_text()) for p in args.reports])
    else:
        types = [t.strip() for t in args.types.split(",") if t.strip()] if args.types else None
        report = sweep(types, engines=args.engines, remeasure=args.remeasure,
                       on_row=lambda row: print(row_line(row), flush=True))
    print(summary(report))
    if args.json:
        Path(args.json).write_text(report.to_json() + "\n")
        print(f"wrote {args.json}")
    if args.readme:
        write_readme(Path(args.readme), report)
        print(f"wrote the families table into {args.readme}")
    return 1 if report.counts()["fails"] else 0
