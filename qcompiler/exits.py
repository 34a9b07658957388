"""How a ``qcompile`` run ends: exit codes, SIGTERM as an exception, bugs and log records as one line.

Kept apart from the argument handling in `qcompiler.cli`, which reads them.
"""

from __future__ import annotations

import logging
import pathlib

import onnx_ir as ir

from qcompiler import errors

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_BUDGET_NOT_MET = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def artifact_files(path: pathlib.Path) -> list[pathlib.Path]:
    """The files a saved artifact consists of: the model and its weights (``.bin`` / ``.onnx.data``)."""
    companion = path.with_suffix(".bin") if path.suffix == ".xml" else path.with_name(path.name + ".data")
    return [path, companion]


def without_traceback(record: logging.LogRecord) -> bool:
    """Keep the record, drop its traceback (`--debug` shows them)."""
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt so every ``finally`` cleans up."""


def raise_terminated(signum: int, frame: object) -> None:
    """The SIGTERM handler `qcompiler.cli.main` installs."""
    raise Terminated


def internal_error_line(exc: BaseException) -> str:
    """A bug as one line: where it happened (stage, node), the innermost cause, no traceback."""
    located = errors.where(exc)
    while isinstance(exc, ir.passes.PassError) and exc.__cause__ is not None:  # names pass objects only
        exc = exc.__cause__
        located = located or errors.where(exc)
    message = (str(exc).strip().splitlines() or [""])[0][:300]
    return (
        f"qcompile: internal error{located}: {type(exc).__name__}: {message} "
        "(a bug: rerun with --debug for the traceback and report it)"
    )
