"""The ``%mp`` and ``%%mp`` magics: argument parsing and a call into the workbench, no more.

Line commands::

    In [1]: %load_ext mpbook
    In [2]: %mp start -n 2 --cpu
    started 2 engines in 2.4 s
    rank  host  pid    device  backend  threads  free / total memory
    0     vm    41022  cpu     gloo     1        22.6 GiB / 23.5 GiB
    1     vm    41027  cpu     gloo     1        22.6 GiB / 23.5 GiB
    In [3]: %mp status
    In [4]: %mp restart
    In [5]: %mp dashboard        # a standing dashboard: follows every cell, refreshes between them
    In [6]: %mp stop

Cell commands::

    In [7]: %%mp run --ranks 0
       ...: print(rank, world_size, device)
    [rank 0] 0 2 cpu

    In [8]: %%mp tensor --model tiny --max-new-tokens 16 --temperature 0.7 --seed 1
       ...: Explain pipeline parallelism in one sentence.
       ...: What does an all-reduce do?

``%mp COMMAND --help`` prints a command's options. A cell shows a live dashboard while it
runs (``--no-dashboard`` leaves it out): widgets in a notebook, lines of text in a terminal.
"""

from __future__ import annotations

import argparse
import difflib
import time

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser
from IPython.utils.process import arg_split

from .compat import argparse as argparse_compat
from .errors import CellInterrupted, MpbookError, NoClusterError
from .options import (
    DEFAULT_PERIOD_S, DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S, argtype, check_degree, check_engine_count, check_max_new_tokens,
    check_microbatches, check_period, check_repetition_penalty, check_seed, check_temperature, check_timeout,
    check_top_k, check_top_p,
)
from .protocol import DEFAULT_DTYPE, DEFAULT_MAX_NEW_TOKENS, DEFAULT_MODEL, DTYPE_CHOICES
from .workbench import Workbench

LINE_COMMANDS = ("start", "status", "stop", "restart", "dashboard")
STRATEGY_COMMANDS = ("data", "pipeline", "tensor", "expert")
STRATEGY_HELP = {
    "data": "replicas; the prompts are split across them",
    "pipeline": "consecutive layers per engine; micro-batches flow through",
    "tensor": "every weight matrix split across engines",
    "expert": "a mixture-of-experts model's experts split across engines",
}


def one_line(message: str) -> str:
    """A usage message on one line, whatever odd characters the input carried into it."""
    return " ".join(message.split()) or "invalid %mp arguments; see `%mp?`"


def _help_flag(parser: argparse.ArgumentParser) -> None:
    # IPython's parser has no -h (argparse's would exit the kernel): a flag the magic answers.
    parser.add_argument("-h", "--help", action="store_true", help="show this command's options and return")


def build_parser() -> MagicArgumentParser:
    """One parser for ``%mp`` and ``%%mp``; each command is a sub-parser."""
    parser = MagicArgumentParser(prog="%mp", description="Run cells on a cluster of engines, one per device.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=description or help, prog=f"%mp {name}",
                                  formatter_class=argparse.HelpFormatter)
        _help_flag(sub)
        return sub

    _start_options(command("start", "start engines (or attach to a running cluster)"))
    status = command("status", "show the engines table")
    status.add_argument("--links", action="store_true",
                        help="measure latency and bandwidth between every pair of ranks first (a few seconds)")
    command("stop", "stop the engines mpbook started (leave an attached cluster running)")
    command("restart", "restart the cluster with the same layout")
    dash = command("dashboard", "show a dashboard that follows every cell and refreshes between them")
    dash.add_argument("--period", type=argtype(check_period, "float", "--period"), default=DEFAULT_PERIOD_S,
                      help=f"seconds between refreshes while idle (default {DEFAULT_PERIOD_S:g})")
    dash.add_argument("--off", action="store_true", help="stop the standing dashboard")

    run = command("run", "(cell) run the cell's Python on every rank")
    run.add_argument("--ranks", default=None, help="ranks to run on: 'all' (default), '0', '0,2' or '1-3'")
    run.add_argument("--no-dashboard", action="store_true", help="no live dashboard for this cell")

    for strategy, what in STRATEGY_HELP.items():
        cmd = command(strategy, f"(cell) generate with {strategy} parallelism: {what}",
                      f"Generate with {strategy} parallelism ({what}); one prompt per line of the cell.")
        _model_and_layout_options(cmd)
        _prompt_options(cmd)
        _sampling_options(cmd)
        cmd.add_argument("--stop", action="append", default=None, help="stop a prompt at this text (repeatable)")
        cmd.add_argument("--ignore-eos", action="store_true",
                         help="run every prompt to --max-new-tokens (benchmarks)")
        cmd.add_argument("--compile", action="store_true",
                         help="static KV cache and torch.compile of the decode step (compiled once per shape, "
                              "reused by later cells)")
        cmd.add_argument("--dense-weights", action="store_true",
                         help="CPU engines: keep the weights plain tensors, not packed for oneDNN, and every product "
                              "on F.linear (for a model whose code reads a layer's weight itself)")
        cmd.add_argument("--prompts", default=None,
                         help="take the prompts from this variable (a str, a list of str, or of chat message lists)")
        cmd.add_argument("-o", "--out", default="_mp", help="name for the result object (default _mp)")
        cmd.add_argument("--no-dashboard", action="store_true", help="no live dashboard for this cell")
    return parser


def _start_options(start: argparse.ArgumentParser) -> None:
    """``%mp start``: how many engines, on what, where, or which running cluster to attach to."""
    start.add_argument("-n", type=argtype(check_engine_count, "int", "-n"), default=None,
                       help="number of engines (default: one per GPU, else 2)")
    devices = start.add_mutually_exclusive_group()
    devices.add_argument("--cpu", action="store_true", help="CPU engines (gloo) even if GPUs are visible")
    devices.add_argument("--gpu", action="store_true", help="GPU engines (NCCL); an error when none is visible")
    start.add_argument("--transport", choices=("auto", "mpi", "gloo"), default="auto",
                       help="CPU engines' collectives: mpi (engines started by mpiexec, shared memory), gloo, "
                            "or auto (default: mpi when installed)")
    start.add_argument("--hosts", default=None,
                       help="engines on other hosts, e.g. hosta:2,hostb:2 (names as ssh knows them); ranks follow the hosts")
    start.add_argument("--ip", default=None,
                       help="with --hosts: the address of this host the hosts reach (default: the route's)")
    start.add_argument("--launcher", choices=("ssh", "mpi", "slurm"), default="ssh",
                       help="with --hosts: ipyparallel's launcher for the engines (default ssh)")
    start.add_argument("--python", default=None,
                       help="with --hosts: the Python on the hosts (default: this one's path)")
    start.add_argument("--profile", default=None, help="attach to the running cluster of this IPython profile")
    start.add_argument("--cluster-id", default=None, help="attach to the running cluster with this id")
    start.add_argument(
        "--timeout", type=argtype(check_timeout, "float", "--timeout"), default=DEFAULT_TIMEOUT_S,
        help=f"seconds a collective may wait before every rank gets an error (default {DEFAULT_TIMEOUT_S:g}, "
             f"at most {MAX_TIMEOUT_S:g})",
    )


def _model_and_layout_options(cmd: argparse.ArgumentParser) -> None:
    """A strategy cell's model, degrees, micro-batches, new tokens, dtype, stages, attention and plans."""
    cmd.add_argument("--model", default=DEFAULT_MODEL,
                     help=f"hub id, save_pretrained folder, or a preset: '{DEFAULT_MODEL}' (default) or 'small'")
    for dim in ("dp", "pp", "tp", "ep"):
        cmd.add_argument(f"--{dim}", type=argtype(lambda v, d=dim: check_degree(d, v), "int", f"--{dim}"),
                         default=None, help=f"{dim} degree (default: what the others leave)")
    cmd.add_argument("--microbatches", type=argtype(check_microbatches, "int", "--microbatches"), default=None,
                     help="micro-batches per replica (default: one per pipeline stage, as rows allow)")
    cmd.add_argument("--max-new-tokens", type=argtype(check_max_new_tokens, "int", "--max-new-tokens"),
                     default=DEFAULT_MAX_NEW_TOKENS,
                     help=f"at most this many new tokens (default {DEFAULT_MAX_NEW_TOKENS}); 0: a forward pass")
    others = " or ".join(d for d in DTYPE_CHOICES if d != DEFAULT_DTYPE)
    cmd.add_argument("--dtype", default=DEFAULT_DTYPE, help=f"{DEFAULT_DTYPE} (default), {others}")
    cmd.add_argument("--stages", default=None, help="layers per pipeline stage, e.g. 4,2 (default: balanced)")
    cmd.add_argument("--attn", default=None,
                     help="attention implementation (default: the one transformers picks), e.g. sdpa, eager")
    cmd.add_argument("--plan", default=None,
                     help="a variable holding parallel plans for a family without its own "
                          "({'tp': {...}, 'pp': {...}} in transformers' format)")


def _prompt_options(cmd: argparse.ArgumentParser) -> None:
    """How a strategy cell's lines become prompts: through the chat template or as they are."""
    chat = cmd.add_mutually_exclusive_group()
    chat.add_argument("--chat", action="store_true", default=None,
                      help="each line is a user message through the chat template (default when the model has one)")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="send each line as plain text")
    cmd.add_argument("--system", default=None, help="a system message before each prompt (chat)")


def _sampling_options(cmd: argparse.ArgumentParser) -> None:
    """How a strategy cell chooses tokens: greedy unless one of these samples."""
    cmd.add_argument("--temperature", type=argtype(check_temperature, "float", "--temperature"), default=None,
                     help="sample at this temperature (default: greedy; 0 is greedy)")
    cmd.add_argument("--top-k", type=argtype(check_top_k, "int", "--top-k"), default=None,
                     help="sample from the k likeliest tokens")
    cmd.add_argument("--top-p", type=argtype(check_top_p, "float", "--top-p"), default=None,
                     help="sample from the likeliest tokens holding this probability mass")
    cmd.add_argument("--repetition-penalty", type=argtype(check_repetition_penalty, "float", "--repetition-penalty"),
                     default=None, help="penalize tokens already in the text (1: off)")
    cmd.add_argument("--seed", type=argtype(check_seed, "int", "--seed"), default=None,
                     help="seed of the sampling: the same seed gives the same texts on every layout")


def usage() -> str:
    """``%mp?``: the commands, one line each, and where to find each one's options."""
    lines = ["%mp COMMAND [options]  (line)  |  %%mp COMMAND [options]  (cell)", "", "Commands:"]
    for name, help in argparse_compat.subcommand_help(build_parser()).items():
        lines.append(f"  {name:<10} {help}")
    lines += ["", "`%mp COMMAND --help` lists a command's options.", "", __doc__.split("\n\n", 1)[1]]
    return "\n".join(lines)


class HelpRequested(Exception):
    """``--help`` was given: the text to print instead of running the command."""


def parse(line: str, *, cell: bool) -> argparse.Namespace:
    """Parse a ``%mp`` line (``cell=False``) or the first line of a ``%%mp`` cell.

    Returns the arguments, or raises UsageError with a one-line message, or HelpRequested.
    """
    parser = build_parser()
    if line.strip() in ("-h", "--help", "help"):
        raise HelpRequested(usage())
    try:
        words = arg_split(line, posix=True)  # a shell's quoting: --stop "the end"
        args, extras = parser.parse_known_args(words)
    except UsageError as exc:  # argparse's message may quote the input, newlines and all
        raise UsageError(one_line(f"{exc}{_command_suggestion(parser, words)}")) from None
    except ValueError as exc:  # e.g. an unbalanced quote
        raise UsageError(one_line(f"%mp {line.strip()}: {exc}")) from None
    if extras:
        raise UsageError(one_line(f"unrecognized arguments: {' '.join(extras)}{_option_suggestion(parser, args, extras)}"))
    if getattr(args, "help", False):
        raise HelpRequested(argparse_compat.subcommands(parser)[args.command].format_help())
    _check_single_values(parser, args)
    if cell and args.command in LINE_COMMANDS:
        raise UsageError(f"`%mp {args.command}` is a line command: write it as `%mp {args.command}`, without a cell body")
    if not cell and args.command in STRATEGY_COMMANDS and args.prompts is not None:
        return args  # `%mp tensor --prompts questions`: the prompts come from a variable
    if not cell and args.command not in LINE_COMMANDS:
        extra = " (one prompt per line), or pass --prompts VARIABLE" if args.command in STRATEGY_COMMANDS else ""
        raise UsageError(
            f"`%mp {args.command}` needs a cell: write `%%mp {args.command}` as the first line of a cell{extra}"
        )
    return args


def _close(word: str, choices) -> str | None:
    """The one of ``choices`` that ``word`` most likely meant (a typo), or None; leading dashes
    are left out of the likeness (``--model`` is not close to ``--help``)."""
    bare = {choice.lstrip("-"): choice for choice in choices}
    close = difflib.get_close_matches(word.lstrip("-"), list(bare), n=1, cutoff=0.7)
    return bare[close[0]] if close else None


def _command_suggestion(parser: argparse.ArgumentParser, words: list[str]) -> str:
    # Python 3.11's argparse has no "did you mean" (3.14's suggest_on_error): the commands are few.
    first = next((w for w in words if not w.startswith("-")), None)
    commands = argparse_compat.subcommands(parser)
    if first is None or first in commands:
        return ""
    close = _close(first, commands)
    return f"; did you mean `%mp {close}`?" if close else "; `%mp?` lists the commands"


def _option_suggestion(parser: argparse.ArgumentParser, args: argparse.Namespace, extras: list[str]) -> str:
    """For each unknown option of ``extras``, the command's option it most likely meant."""
    commands = argparse_compat.subcommands(parser)
    if args.command not in commands:
        return ""
    options = {name: [o for a in argparse_compat.actions(sub) for o in a.option_strings]
               for name, sub in commands.items()}
    meant, elsewhere = [], []
    for word in extras:
        name = word.split("=", 1)[0]
        if not name.startswith("-"):
            continue
        # an option of another command (`%mp restart -n 2`: -n is start's), else a typo
        other = [f"{name} is an option of `%mp {c}`" for c, opts in options.items() if name in opts][:1]
        close = None if other else _close(name, options[args.command])
        elsewhere += other
        meant += [close] if close is not None else []
    hint = f"`%mp {args.command} --help` lists its options"
    said = [f"did you mean {' or '.join(dict.fromkeys(meant))}?"] if meant else []
    return "; " + "; ".join(said + elsewhere + [hint])


def _check_single_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    # argparse (3.11) turns a value of exactly "--" written as `--opt=--` or `-n--` into an
    # empty list instead of an error; an option that takes one value must hold one.
    command = argparse_compat.subcommands(parser).get(args.command, parser)
    for action in argparse_compat.actions(command):
        value = getattr(args, action.dest, None)
        if action.option_strings and action.nargs is None and isinstance(value, list):
            # an append option holds a list of values; "--" gives it an empty list among them
            if not argparse_compat.appends(action) or any(v == [] for v in value):
                raise UsageError(f"argument {'/'.join(action.option_strings)}: expected one argument, got '--'")


@magics_class
class MpMagics(Magics):
    """``%mp`` / ``%%mp``: the notebook face of :class:`mpbook.Workbench`."""

    def __init__(self, shell):
        super().__init__(shell)
        self.workbench: Workbench | None = None
        self.standing = None  # mpbook.dashboard's standing dashboard of `%mp dashboard`

    @line_cell_magic
    def mp(self, line: str, cell: str | None = None):
        try:
            args = parse(line, cell=cell is not None)
        except HelpRequested as help:
            print(help)
            return None
        try:
            return getattr(self, f"_{args.command}")(args, cell)
        except NoClusterError as exc:
            raise UsageError(one_line(str(exc))) from None
        except MpbookError as exc:
            if hasattr(exc, "failures"):  # a rank's error: keep its traceback
                raise
            raise UsageError(one_line(str(exc))) from None
        except KeyboardInterrupt:
            # The engines were interrupted and the process group formed again. The cell still
            # ends interrupted (the queue of a "Run All" stops here), in one line.
            raise CellInterrupted from None

    mp.__doc__ = usage()

    # ------------------------------------------------------------------ commands
    def _require(self, what: str) -> Workbench:
        if self.workbench is None:
            raise NoClusterError(what)
        return self.workbench

    def _start(self, args, cell):
        if self.workbench is not None:
            raise MpbookError(
                f"a cluster is already running ({self.workbench.world_size} engines on {self.workbench.device_type}); "
                "`%mp stop` it first, or `%mp restart` it"
            )
        began = time.perf_counter()
        if args.profile or args.cluster_id:
            self.workbench = Workbench.attach(
                profile=args.profile, cluster_id=args.cluster_id, cpu=args.cpu, n=args.n, timeout_s=args.timeout,
                transport=args.transport,
            )
            verb = "attached to"
        else:
            if args.hosts is None and (args.ip or args.launcher != "ssh" or args.python):
                raise MpbookError("--ip, --launcher and --python are for engines on other hosts: add --hosts, "
                                  "e.g. --hosts hosta:2,hostb:2")
            self.workbench = Workbench.start(args.n, cpu=args.cpu, gpu=args.gpu, timeout_s=args.timeout,
                                             transport=args.transport, hosts=args.hosts, ip=args.ip,
                                             launcher=args.launcher, python=args.python)
            verb = "started"
        wb = self.workbench
        print(f"{verb} {wb.world_size} engine{'s' if wb.world_size != 1 else ''} in {time.perf_counter() - began:.1f} s")
        print(wb.table())

    def _status(self, args, cell):
        wb = self._require("asking for status")
        wb.status()
        if args.links:
            from .bench_links import format_links

            print(format_links(wb.measure_links()).rsplit("\n", 1)[0])  # the summary comes with the table
        print(wb.table())

    def _stop(self, args, cell):
        wb = self._require("stopping it")
        self.workbench = None
        try:
            wb.stop()
        finally:
            self._stop_dashboard()  # after the stop, so that it shows "the cluster stopped"
        print("stopped the cluster" if wb.owned else "left the attached cluster (its engines keep running)")

    def _restart(self, args, cell):
        wb = self._require("restarting it")
        began = time.perf_counter()
        wb.restart()
        print(f"restarted {wb.world_size} engines in {time.perf_counter() - began:.1f} s")
        print(wb.table())

    def _run(self, args, cell):
        wb = self._require("running a cell")
        wb.run(cell, ranks=args.ranks, dashboard=not args.no_dashboard)

    def _dashboard(self, args, cell):
        self._stop_dashboard()
        if args.off:
            return
        from .dashboard import stand

        self.standing = stand(self._require("showing a dashboard"), period_s=args.period)

    def _stop_dashboard(self) -> None:
        if self.standing is not None:
            self.standing.stop()
            self.standing = None

    def _strategy(self, args, cell):
        wb = self._require(f"running `%%mp {args.command}`")
        prompts = self._prompts(args, cell)
        result = wb.generate(
            prompts,
            strategy=args.command,
            model=args.model,
            dp=args.dp, pp=args.pp, tp=args.tp, ep=args.ep,
            microbatches=args.microbatches,
            max_new_tokens=args.max_new_tokens,
            dtype=args.dtype,
            stage_sizes=args.stages,
            attention=args.attn,
            plans=self._variable(args.plan, "--plan", dict) if args.plan else None,
            chat=args.chat,
            system=args.system,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            stop=args.stop,
            ignore_eos=args.ignore_eos,
            compile=args.compile,
            dense_weights=args.dense_weights,
            dashboard=not args.no_dashboard,
        )
        self.shell.user_ns[args.out] = result
        for i, (prompt, text) in enumerate(zip(result.prompts, result.texts)):
            print(f"[{i}] {prompt}\n    -> {preview(text, f'{args.out}.texts[{i}]')}")
        print(result.summary())
        print(f"(the result is in `{args.out}`)")

    _data = _pipeline = _tensor = _expert = _strategy

    def _variable(self, name: str, flag: str, kind):
        if name not in self.shell.user_ns:
            raise MpbookError(f"{flag} {name}: no variable of that name in the notebook")
        value = self.shell.user_ns[name]
        if not isinstance(value, kind):
            raise MpbookError(f"{flag} {name}: expected a {kind.__name__}, got {type(value).__name__}")
        return value

    def _prompts(self, args, cell: str) -> list:
        lines = [line.strip() for line in (cell or "").splitlines() if line.strip()]
        if args.prompts is None:
            return lines
        if lines:
            raise MpbookError("give the prompts either in the cell or with --prompts, not both")
        if args.prompts not in self.shell.user_ns:
            raise MpbookError(f"--prompts {args.prompts}: no variable of that name in the notebook")
        value = self.shell.user_ns[args.prompts]
        if isinstance(value, str):
            return [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(p, (str, list, tuple)) for p in value):
            raise MpbookError(
                f"--prompts {args.prompts}: expected a str, a list of str, or a list of chat message lists, "
                f"got {type(value).__name__}"
            )
        return list(value)

    def close(self) -> None:
        self._stop_dashboard()
        if self.workbench is not None:
            self.workbench.stop()
            self.workbench = None


PREVIEW_CHARS = 160  # of each generated text a strategy cell prints; the result keeps all of it


def preview(text: str, where: str) -> str:
    """``text`` as a repr, cut to PREVIEW_CHARS characters with a note of where the rest is."""
    if len(text) <= PREVIEW_CHARS:
        return repr(text)
    return f"{text[:PREVIEW_CHARS]!r} ... ({len(text) - PREVIEW_CHARS} more characters in `{where}`)"
