"""``mpbook.explore(model, engines=wb)``: try layouts live, prediction and measurement side by side.

A panel of ipywidgets. Its controls choose the layout (dp, pp, tp, ep: only degrees some valid
layout of the model uses are offered; moving one completes the others to a valid layout over
the engines), the micro-batches, dtype, batch, prompt and new tokens. As they move, the memory
plan and the speed model (:func:`mpbook.plan` with the cluster's calibration,
:mod:`mpbook.planner.speed`) update the per-rank memory bars and the predicted tokens/s at
once, from what was read when the panel was made: no engine is called. **Run** generates with
the chosen layout on the cluster under the live dashboard; each run adds a row to the table
(predicted against measured tokens/s, memory per rank, the measured decode step by part) and
two points to the plot (tokens/s against memory per rank, predicted hollow, measured filled).

``explorer.table`` is the rows as data, a list of dicts (``pandas.DataFrame(explorer.table)``
makes a frame of them). ``explorer.set(tp=2, batch=4)`` moves the controls from code, ``explorer.run()``
presses Run.
"""

from __future__ import annotations

import html
import io
from typing import Any

from .errors import MpbookError
from .layout import Layout
from .units import format_bytes

DIMS = ("dp", "pp", "tp", "ep")
DTYPES = ("float32", "bfloat16", "float16")
AUTO = 0  # the micro-batches control's "auto": as a run chooses (one per stage, as many as can compute at once)
DEFAULT_PROMPT = "Model parallelism spreads a model over several devices so that"
BAR_COLOURS = {"weights": "#4e79a7", "KV cache": "#f28e2b", "activations": "#59a14f"}


class Explorer:
    """The panel; see the module's docstring. Made by :func:`mpbook.explore`."""

    def __init__(self, model, *, engines=None, batch: int = 8, new_tokens: int = 32, prompt: str = DEFAULT_PROMPT,
                 dtype: str = "float32", calibrate: bool = True, log=print):
        from . import models
        from .planner import plan
        from .planner.calibrating import calibrate as measure
        from .planner.calibration import kept_calibration
        from .planner.suggestions import valid_layouts

        engines = engines if engines is not None else _magics_cluster()
        if not hasattr(engines, "generate") or getattr(engines, "stopped", False):
            raise MpbookError("explore() needs a running cluster: %mp start -n 2 in this notebook, or "
                              "engines=Workbench.start(2)")
        self.model = model
        self.engines = engines
        self.world = engines.world_size
        self.config = models.PRESETS[model]() if model in models.PRESETS else models.load_config(model)
        self.family = self.config.get_text_config(decoder=True).model_type
        self.layouts = valid_layouts(self.config, self.world)
        if not self.layouts:
            raise MpbookError(f"no layout of {self.world} engines can run {model!r}; see mpbook.plan({model!r}, "
                              f"engines={self.world}) for why")
        self._calibrations: dict[str, Any] = {}
        self._calibrate = (lambda d: measure(engines, dtype=d, model_types=(self.family,), log=log)) if calibrate \
            else (lambda d: kept_calibration(engines, d))
        self._calibration(dtype)
        # Where each rank runs and its free memory, asked once: every later plan reuses them.
        first = self.layouts[0]  # any layout: only the devices are read
        self.devices = plan(self.config, **_dims(first), batch=1, prompt_len=1, max_new_tokens=1, engines=engines,
                            suggestions=False).devices
        self._prompt_lengths: dict[str, int] = {}
        self.rows: list[dict[str, Any]] = []
        self.results: list[Any] = []
        self.prediction = None  # the MemoryPlan (with .speed) of the controls' current values
        self.problem: str | None = None  # why the current choice cannot run
        self._quiet = False
        self._build(batch=batch, new_tokens=new_tokens, prompt=prompt, dtype=dtype)
        self._update()

    # ----------------------------------------------------------------- from code
    def set(self, **values) -> Explorer:
        """Move controls: ``dp``, ``pp``, ``tp``, ``ep``, ``microbatches`` (0: auto), ``dtype``,
        ``batch``, ``prompt``, ``new_tokens``; as a person would, one after another."""
        for name, value in values.items():
            control = self.controls.get(name)
            if control is None:
                raise MpbookError(f"explore has no control {name!r}; use one of {', '.join(self.controls)}")
            if name in DIMS and value not in control.options:
                raise MpbookError(f"{name}={value}: not offered for {self.model!r} on {self.world} engines; "
                                  f"choose one of {list(control.options)}")
            control.value = value
        return self

    def run(self):
        """Generate with the chosen layout on the cluster; add a row to the table. Returns the result."""
        if self.problem is not None:
            raise MpbookError(f"cannot run this choice: {self.problem}")
        choice, predicted = self.choice(), self.prediction
        layout = predicted.layout
        self.run_button.disabled = True
        self.status.value = f"<span class='mpbook-explore-running'>running {html.escape(str(layout))} ...</span>"
        try:
            result = self.engines.generate(
                [choice["prompt"]] * choice["batch"], strategy=layout.strategy, model=self.model, **_dims(layout),
                microbatches=predicted.workload.microbatches, dtype=choice["dtype"],
                max_new_tokens=choice["new_tokens"], chat=False, ignore_eos=True, dashboard=self.dashboard)
        finally:
            self.run_button.disabled = self.problem is not None
        self.results.append(result)
        self.rows.append(_row(predicted, result))
        self._show_runs()
        self._update()
        return result

    @property
    def table(self) -> list[dict[str, Any]]:
        """Every run so far, one dict per run (``pandas.DataFrame(explorer.table)`` makes a frame)."""
        return [dict(r) for r in self.rows]

    def choice(self) -> dict[str, Any]:
        return {name: control.value for name, control in self.controls.items()}

    # ----------------------------------------------------------------- the widgets, built once
    def _build(self, *, batch: int, new_tokens: int, prompt: str, dtype: str) -> None:
        import ipywidgets as w

        # Data parallel first when the model allows it: the layout people know.
        first = next((x for x in self.layouts if x.dp == self.world), self.layouts[0])
        offered = {d: sorted({getattr(x, d) for x in self.layouts}) for d in DIMS}
        positions = getattr(self.config.get_text_config(decoder=True), "max_position_embeddings", None) or 4096
        self.controls = {
            **{d: w.ToggleButtons(options=offered[d], value=getattr(first, d), description=d,
                                  style={"button_width": "42px"}) for d in DIMS},
            "microbatches": w.Dropdown(options=[("auto", AUTO)], value=AUTO, description="micro-batches"),
            "dtype": w.Dropdown(options=DTYPES, value=dtype, description="dtype"),
            "batch": w.IntSlider(value=batch, min=1, max=max(64, batch), description="batch"),
            "prompt": w.Text(value=prompt, description="prompt", layout=w.Layout(width="90%")),
            "new_tokens": w.IntSlider(value=new_tokens, min=1, max=min(512, positions // 2), description="new tokens"),
        }
        for name, control in self.controls.items():
            control.add_class(f"mpbook-explore-{name.replace('_', '-')}")
            control.observe(lambda change, name=name: self._changed(name, change), names="value")
        left_out = _left_out(self.config, self.world, offered)
        self.offered_note = w.HTML(f"<small>{html.escape(left_out)}</small>" if left_out else "")
        self.status = w.HTML()
        self.status.add_class("mpbook-explore-status")
        self.prediction_view = w.HTML()
        self.prediction_view.add_class("mpbook-explore-prediction")
        self.memory_bars = w.HTML()
        self.memory_bars.add_class("mpbook-explore-memory")
        self.run_button = w.Button(description="Run", button_style="primary", icon="play")
        self.run_button.add_class("mpbook-explore-run")
        self.run_button.on_click(lambda _: self._run_from_button())
        from .dashboard import Dashboard

        self.dashboard = Dashboard(self.engines, mode="widget")
        self.table_view = w.HTML("<i>no runs yet: press Run</i>")
        self.table_view.add_class("mpbook-explore-table")
        # Hidden until the first run has a point to show (an empty image shows as a broken one).
        self.plot_view = w.Image(format="png", layout=w.Layout(max_width="560px", display="none"))
        calibration = self._calibrations.get(dtype)
        self.calibration_note = w.HTML(
            f"<small>machine: {html.escape(calibration.summary())}</small>" if calibration else
            "<small>machine not calibrated: memory only (explore(..., calibrate=True) measures it)</small>")
        self.widget = w.VBox([
            w.HTML(f"<b>explore {html.escape(str(self.model))}</b> on {self.world} engines"),
            w.HBox([self.controls[d] for d in DIMS[:2]]), w.HBox([self.controls[d] for d in DIMS[2:]]),
            self.offered_note,
            w.HBox([self.controls["microbatches"], self.controls["dtype"]]),
            w.HBox([self.controls["batch"], self.controls["new_tokens"]]), self.controls["prompt"],
            self.status, self.prediction_view, self.memory_bars, self.calibration_note,
            self.run_button, self.dashboard.widget, self.table_view, self.plot_view,
        ])
        self.widget.add_class("mpbook-explore")

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    # ----------------------------------------------------------------- as the controls move
    def _changed(self, name: str, change) -> None:
        if self._quiet:
            return
        if name in DIMS:
            self._complete(name, change["new"])
        self._update()

    def _complete(self, dim: str, value: int) -> None:
        """The other degrees follow, to the valid layout that changes fewest of them."""
        now = {d: self.controls[d].value for d in DIMS}
        candidates = [x for x in self.layouts if getattr(x, dim) == value]
        if not candidates:
            return
        best = min(candidates, key=lambda x: (sum(getattr(x, d) != now[d] for d in DIMS), x.tp, x.pp, x.ep))
        self._quiet = True
        try:
            for d in DIMS:
                self.controls[d].value = getattr(best, d)
        finally:
            self._quiet = False

    def _update(self) -> None:
        """Plan the current choice (memory and speed) and show it; no engine is called."""
        from .planner import plan
        from .planner.suggestions import why_invalid

        choice = self.choice()
        layout_dims = {d: choice[d] for d in DIMS}
        rows = choice["batch"] // max(choice["dp"], 1)
        self._offer_microbatches(choice["pp"], rows)
        microbatches = self.controls["microbatches"].value
        if microbatches == AUTO:
            from .layout import Layout
            from .parallel.pipeline import layout_microbatches

            microbatches = layout_microbatches(Layout(**layout_dims), max(rows, 1), self.engines.cluster.ranks_at_once)
        try:
            self.prediction = plan(
                self.config, **layout_dims, batch=choice["batch"], prompt_len=self._prompt_length(choice["prompt"]),
                max_new_tokens=choice["new_tokens"], dtype=choice["dtype"], microbatches=microbatches,
                devices=self.devices, calibration=self._calibration(choice["dtype"]), suggestions=False)
            # What a run would refuse beyond the plan's checks: replicas or micro-batches without prompts.
            self.problem = why_invalid(self.config, self.prediction.layout, choice["batch"], microbatches=microbatches)
            if self.problem is None and not self.prediction.fits:
                self.problem = "does not fit: " + _worst(self.prediction)
        except MpbookError as exc:
            self.prediction, self.problem = None, str(exc)
        self.run_button.disabled = self.problem is not None
        self._show_prediction()

    def _offer_microbatches(self, stages: int, rows: int) -> None:
        """1..rows of a replica for a pipeline; only auto (1) without one."""
        options = [("auto", AUTO)] + ([(str(m), m) for m in range(1, rows + 1)] if stages > 1 else [])
        control = self.controls["microbatches"]
        if list(control.options) != options:
            self._quiet = True
            try:
                value = control.value if control.value in dict(options).values() else AUTO
                control.options = options
                control.value = value
            finally:
                self._quiet = False
        control.disabled = stages == 1
        control.tooltip = None if stages > 1 else "only a pipeline (pp > 1) cuts micro-batches"

    def _prompt_length(self, prompt: str) -> int:
        if prompt not in self._prompt_lengths:
            from .models import load_tokenizer
            from .session.prompts import encode_prompts

            # As a run encodes its prompts (the text as it is: explore's runs send no chat template).
            encoded = encode_prompts(load_tokenizer(self.model), [prompt or " "], chat=False)
            self._prompt_lengths[prompt] = max(len(encoded.input_ids[0]), 1)
        return self._prompt_lengths[prompt]

    def _calibration(self, dtype: str):
        if dtype not in self._calibrations:
            self._calibrations[dtype] = self._calibrate(dtype)
        return self._calibrations[dtype]

    # ----------------------------------------------------------------- views
    def _show_prediction(self) -> None:
        p = self.prediction
        if p is None:
            self.status.value = f"<span style='color:#b00020'>invalid: {html.escape(self.problem or '')}</span>"
            self.prediction_view.value = ""
            self.memory_bars.value = ""
            return
        fits = "fits" if p.fits else "<b style='color:#b00020'>does not fit</b>"
        if self.problem is not None:
            fits = f"<b style='color:#b00020'>cannot run: {html.escape(self.problem)}</b>"
        self.status.value = (f"<code>{html.escape(str(p.layout))}</code>, {p.workload.microbatches} micro-batch"
                             f"{'es' if p.workload.microbatches != 1 else ''}: {fits}, at most "
                             f"{format_bytes(p.peak_bytes)} on a rank")
        if p.speed is None:
            self.prediction_view.value = "<i>no speed prediction: the machine is not calibrated</i>"
        else:
            s = p.speed
            self.prediction_view.value = (
                f"predicted decode <b class='mpbook-explore-tokens'>{s.decode_tokens_per_s:,.0f}</b> tok/s, "
                f"prefill {s.prefill_tokens_per_s:,.0f} tok/s; {html.escape(s.bound)}"
                + (f", bubble {s.bubble:.0%}" if p.layout.pp > 1 else "")
                + f"<details><summary>arithmetic</summary><pre>{html.escape(chr(10).join(s.arithmetic()))}</pre>"
                "</details>")
        self.memory_bars.value = _bars(p)

    def _show_runs(self) -> None:
        self.plot_view.value = _plot_png(self.rows)
        self.plot_view.layout.display = None
        self.table_view.value = _table_html(self.rows)

    def _run_from_button(self) -> None:
        try:
            self.run()
        except Exception as exc:  # noqa: BLE001  the panel says what failed and stays usable
            self.status.value = f"<span style='color:#b00020'>run failed: {html.escape(str(exc).splitlines()[0])}</span>"
            self.run_button.disabled = self.problem is not None


def _magics_cluster():
    """The cluster ``%mp start`` started in this IPython kernel, or None."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    magics = shell.magics_manager.registry.get("MpMagics") if shell is not None else None
    return getattr(magics, "workbench", None)


def _dims(layout: Layout) -> dict[str, int]:
    return {d: getattr(layout, d) for d in DIMS}


def _left_out(config, world: int, offered: dict[str, list[int]]) -> str:
    """Why degrees that divide the engines are not offered: the model's own limits."""
    from .planner.suggestions import why_invalid

    words = []
    for d in DIMS:
        for degree in range(2, world + 1):
            if world % degree or degree in offered[d]:
                continue
            why = why_invalid(config, Layout(**{d: degree}), None)
            if why and d != "ep":
                words.append(f"{d}={degree}: {why}")
    return "not offered: " + "; ".join(words) if words else ""


def _worst(p) -> str:
    worst = max(p.ranks, key=lambda r: r.total - (r.device.free_bytes if r.device else 0))
    return f"rank {worst.rank} needs {format_bytes(worst.total)}, {format_bytes(worst.device.free_bytes)} free"


def _bars(p) -> str:
    """Per rank: weights, KV cache and activations as a stacked bar against the device's memory."""
    capacity = max((r.device.free_bytes for r in p.ranks if r.device), default=p.peak_bytes) or 1
    shared = any(r.device and r.device.shared for r in p.ranks)
    together = sum(r.total for r in p.ranks)
    scale = max(capacity, together if shared else p.peak_bytes)
    out = ["<table class='mpbook-explore-bars' style='border-collapse:collapse'>"]
    for r in p.ranks:
        parts = {"weights": r.weights, "KV cache": r.kv_cache, "activations": r.activations}
        bar = "".join(
            f"<div title='{k} {format_bytes(v)}' style='display:inline-block;height:12px;background:{BAR_COLOURS[k]};"
            f"width:{max(100 * v / scale, 0):.3f}%'></div>" for k, v in parts.items())
        out.append(f"<tr><td style='padding-right:6px'>rank {r.rank}</td><td style='width:360px;background:#eee'>{bar}</td>"
                   f"<td style='padding-left:6px'>{format_bytes(r.total)}</td></tr>")
    what = "host memory the CPU engines share" if shared else "the smallest device's free memory"
    legend = " ".join(f"<span style='color:{c}'>&#9632;</span> {k}" for k, c in BAR_COLOURS.items())
    out.append(f"</table><small>{legend}; the bar's width is {format_bytes(scale)}, {what}</small>")
    return "".join(out)


def _row(predicted, result) -> dict[str, Any]:
    """One run: what was predicted and what was measured, as plain data."""
    speed = predicted.speed
    measured = result.decode_tokens_per_s
    row: dict[str, Any] = {
        "layout": str(result.layout),
        "microbatches": result.microbatches,
        "dtype": result.dtype,
        "batch": len(result.prompts),
        "new_tokens": result.max_new_tokens,
        "predicted_tok_s": round(speed.decode_tokens_per_s, 1) if speed else None,
        "measured_tok_s": round(measured, 1),
        "error": round(speed.decode_tokens_per_s / measured - 1, 3) if speed and measured else None,
        "predicted_peak_bytes": [r.total for r in predicted.ranks],
        # A run counts the parameters it loaded (not the buffers) and its cache: the plan's same two.
        "measured_weights_kv_bytes": [w + k for w, k in zip(result.weight_bytes, result.kv_cache_bytes)],
        "predicted_weights_kv_bytes": [r.parameters + r.kv_cache for r in predicted.ranks],
        "measured_peak_bytes": list(result.peak_memory_bytes),
        "device_type": result.device_type,
        "measured_step_ms": _step_ms(result),
        "predicted_step_ms": ({k: round(1e3 * max(r.parts[k] for r in speed.ranks), 2) for k in speed.ranks[0].parts}
                              if speed else None),
    }
    return row


def _step_ms(result) -> dict[str, float] | None:
    """The measured decode step by part, milliseconds, of the slowest rank."""
    from .engine.steps import START

    ranks = [b for b in result.step_breakdown if b.get("count")]
    if not ranks:
        return None
    slowest = max(ranks, key=lambda b: b["steps"] / b["count"])
    return {k: round(1e3 * v / slowest["count"], 2) for k, v in slowest.items()
            if k != "count" and (v or k != START)}  # no pipeline drain to show: no "waiting at start 0.0"


def _table_html(rows: list[dict[str, Any]]) -> str:
    head = ("layout", "m", "dtype", "batch", "predicted tok/s", "measured tok/s", "error",
            "predicted weights+KV / rank", "measured weights+KV / rank", "predicted peak / rank",
            "measured peak / rank", "measured step, ms")
    body = []
    for r in rows:
        step = r["measured_step_ms"] or {}
        cells = (
            r["layout"], r["microbatches"], r["dtype"], r["batch"], r["predicted_tok_s"], r["measured_tok_s"],
            f"{r['error']:+.0%}" if r["error"] is not None else "-",
            " / ".join(format_bytes(b) for b in r["predicted_weights_kv_bytes"]),
            " / ".join(format_bytes(b) for b in r["measured_weights_kv_bytes"]),
            " / ".join(format_bytes(b) for b in r["predicted_peak_bytes"]),
            " / ".join(format_bytes(b) for b in r["measured_peak_bytes"]) + _peak_kind(r),
            ", ".join(f"{k} {v}" for k, v in step.items()),
        )
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return ("<table class='mpbook-explore-rows'><thead><tr>" + "".join(f"<th>{h}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(body) + "</tbody></table>")


def _peak_kind(row: dict[str, Any]) -> str:
    # A CPU engine's peak is its whole process (Python and torch too), a GPU's torch's tensors.
    return " (process)" if row.get("device_type") == "cpu" else ""


def _plot_png(rows: list[dict[str, Any]]) -> bytes:
    """Tokens/s against memory per rank: predicted (hollow) and measured (filled), joined."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 3.4), dpi=100)
    ax = fig.subplots()
    for r in rows:
        memory = max(r["predicted_peak_bytes"]) / 2**20
        ax.plot([memory], [r["measured_tok_s"]], "o", color="#4e79a7")
        if r["predicted_tok_s"] is not None:
            ax.plot([memory], [r["predicted_tok_s"]], "o", mfc="none", color="#e15759")
            ax.plot([memory, memory], [r["predicted_tok_s"], r["measured_tok_s"]], ":", color="#999")
        ax.annotate(f"{r['layout']} m={r['microbatches']}", (memory, r["measured_tok_s"]), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel("predicted peak memory per rank (MiB)")
    ax.set_ylabel("decode tokens/s")
    ax.plot([], [], "o", color="#4e79a7", label="measured")
    ax.plot([], [], "o", mfc="none", color="#e15759", label="predicted")
    # A fixed corner: "best" searches the points for room, and warns when that is slow.
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
