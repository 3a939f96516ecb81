"""``imgcls`` command line: one subcommand per module, each one call into the Python API.

Errors the user can fix (ImgclsError) print as one line and exit 1; ``--debug`` shows
the traceback. Anything else is an internal error: it says so, and ``--debug`` shows it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from imgcls.cli import audit as _audit
from imgcls.cli import cache as _cache
from imgcls.cli import calibrate as _calibrate
from imgcls.cli import evaluate as _evaluate
from imgcls.cli import explain as _explain
from imgcls.cli import export as _export
from imgcls.cli import label_issues as _label_issues
from imgcls.cli import lr_find as _lr_find
from imgcls.cli import models as _models
from imgcls.cli import predict as _predict
from imgcls.cli import rank as _rank
from imgcls.cli import serve as _serve
from imgcls.cli import shard as _shard
from imgcls.cli import summary as _summary
from imgcls.cli import thresholds as _thresholds
from imgcls.cli import train as _train

# Each command module has NAME, HELP, add_arguments(parser) and run(args) -> int.
COMMANDS = [_train, _evaluate, _calibrate, _predict, _models, _summary, _audit, _cache, _lr_find, _explain, _export,
            _serve, _label_issues, _rank, _shard, _thresholds]


class _Parser(argparse.ArgumentParser):
    """argparse, with a flag mistake said in one line (``imgcls train: error: argument
    --optimizer: invalid choice: 'adamm' (choose from ...) (see imgcls train --help)``) instead
    of the command's whole usage first (48 lines for ``train``), and a near miss of a flag named
    (``--batchsize`` -> ``--batch-size``). Exit code 2, argparse's for usage errors."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}{did_you_mean(self, message)} (see {self.prog} --help)\n")


def did_you_mean(parser: argparse.ArgumentParser, message: str) -> str:
    """`` (did you mean --batch-size?)`` for the first unrecognised flag of ``message`` close to one
    of ``parser``'s, `` (did you mean 'train'?)`` for an invalid choice close to a valid one, else ''."""
    import difflib
    import re

    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
    if choice:
        close = difflib.get_close_matches(choice[1], re.findall(r"'([^']*)'", choice[2]), n=1, cutoff=0.6)
        return f" (did you mean '{close[0]}'?)" if close else ""
    if not message.startswith("unrecognized arguments:"):
        return ""
    known = [o for o in parser._option_string_actions if o.startswith("--")]
    for token in message.split(":", 1)[1].split():
        if token.startswith("--"):
            close = difflib.get_close_matches(token.split("=", 1)[0], known, n=1, cutoff=0.75)
            if close:
                return f" (did you mean {close[0]}?)"
    return ""


def build_parser() -> argparse.ArgumentParser:
    from imgcls.version import __version__

    parser = _Parser(prog="imgcls", description="Train, evaluate and use image classifiers.")
    parser.add_argument("--version", action="version", version=f"imgcls {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parser.commands = {}
    for mod in COMMANDS:
        p = parser.commands[mod.NAME] = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from imgcls.errors import ImgclsError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's parser, which knows its flags (argparse leaves it to the top one)
        parser.commands.get(getattr(args, "command", None), parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("IMGCLS_DEBUG") == "1"
    try:
        return int(args._run(args) or 0)
    except ImgclsError as exc:
        if debug:
            raise
        print(f"imgcls {args.command}: error: {exc.oneline()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"imgcls {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: say so plainly, keep the traceback behind --debug
        if debug:
            raise
        print(f"imgcls {args.command}: internal error: {type(exc).__name__}: {exc} "
              f"(rerun with --debug for the traceback and report it)", file=sys.stderr)
        return 3


def entry() -> None:
    code = main()
    # A finished command leaves at once: after its last line, Python's own teardown (torch's
    # modules, the ~340,000 objects a training run leaves) took 0.9 s of a 16.8 s MNIST
    # `imgcls train` on 2 cores. The exit handlers still run (multiprocessing's, logging's)
    # and the streams are flushed; every file a command writes is closed before it returns.
    # Under a profiler, tracer or debugger (cProfile, coverage, pdb) the exit stays Python's.
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`imgcls ... | head`) or stream
            pass
    os._exit(code)
