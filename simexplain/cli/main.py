"""The ``simexplain`` command: ``explain``, ``explain-dir``, ``report``, ``index``,
``retrieve`` and ``demo``.

Every failure the user can cause (a missing or unreadable file, an unknown model, a
checkpoint that does not fit, no network for ``--pretrained``) ends with one line on
stderr, ``simexplain: error: ...``, and a non-zero exit code, never a traceback.
Set ``SIMEXPLAIN_DEBUG=1`` to get the traceback of an unexpected error.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Any, Optional, Sequence

from .parser import PROG, UsageError, build_parser

__all__ = ["main", "as_flags"]

# Exit codes: 1 for errors while running, 2 for a command line argparse rejects.
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Library errors name Python arguments; on the command line they are flags.
_ARGUMENTS_AS_FLAGS = (
    (re.compile(r"pass pretrained=False"), "leave out --pretrained"),
    (re.compile(r"\bpretrained=True"), "--pretrained"),
    (re.compile(r"\barch='([^']*)'"), r"--arch \1"),
    (re.compile(r"\barch="), "--arch"),
    (re.compile(r"\blayer=None"), "no --layer"),
    (re.compile(r"\blayer="), "--layer"),
    (re.compile(r"\boutput='([^']*)'"), r"--output \1"),
    (re.compile(r"\boutput=(-?[0-9]+)"), r"--output \1"),
    (re.compile(r"\boutput="), "--output"),
    (re.compile(r"\bmethod='([^']*)'"), r"--method \1"),
)


def as_flags(message: str) -> str:
    """A library error message with its Python argument names as this command's flags.

    >>> as_flags("checkpoint a.pt holds weights only; name it with arch='timm:NAME'")
    'checkpoint a.pt holds weights only; name it with --arch timm:NAME'
    """
    for pattern, flag in _ARGUMENTS_AS_FLAGS:
        message = pattern.sub(flag, message)
    return message


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``simexplain`` console script; returns the exit code."""
    command = argv is None  # run as the console script: the demo's time counts from its start
    argv = list(sys.argv[1:] if argv is None else argv)
    shown = warnings.showwarning
    warnings.showwarning = _one_line_notice(shown)
    try:
        return _run(argv, command)
    finally:
        warnings.showwarning = shown


def _run(argv: list[str], command: bool) -> int:
    try:
        if argv[:1] == ["demo"]:
            from ..demo.run import main as demo_main

            return demo_main(argv[1:], whole_process=command)
        args = build_parser().parse_args(argv)
        from . import commands, index_commands
        from .onnx_models import resolve_method

        resolve_method(args)

        run = {"explain": commands.explain_command, "report": commands.report_command,
               "index": index_commands.index_command,
               "retrieve": index_commands.retrieve_command}
        return run.get(args.command, commands.explain_dir_command)(args)
    except SystemExit as exit_request:  # --help, --version, the demo's own parser
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_ERROR
    except UsageError as error:
        return _fail(str(error), EXIT_USAGE)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except Exception as error:
        if os.environ.get("SIMEXPLAIN_DEBUG"):
            raise
        return _fail(_describe(error), EXIT_ERROR)


def _one_line_notice(shown: Any) -> Any:
    """``warnings.showwarning`` writing simexplain's own notices as one line on stderr,
    and other warnings as ``shown`` does."""

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None,
             line: Optional[str] = None) -> None:
        text = str(message)
        if text.startswith("simexplain: "):
            print(f"simexplain: note: {text.removeprefix('simexplain: ')}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    return show


def _describe(error: Exception) -> str:
    from ..errors import SimExplainError

    text = " ".join(str(error).split())
    if isinstance(error, SimExplainError):
        return as_flags(text)
    if isinstance(error, FileNotFoundError):
        return text
    if isinstance(error, OSError):
        return f"{text or type(error).__name__}"
    return (
        f"unexpected {type(error).__name__}: {text} (set SIMEXPLAIN_DEBUG=1 for the traceback)"
    )


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return code
