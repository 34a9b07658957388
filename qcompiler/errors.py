"""One exception family for every failure a user can cause or see.

Each error's message names the file, node, input or option at fault, so the CLI can print it as a
single line and exit non-zero.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class QCompileError(Exception):
    """Base of every error qcompiler raises on purpose."""


class ModelLoadError(QCompileError):
    """The model file is missing, unreadable or not ONNX."""


class InvalidModelError(ModelLoadError):
    """The model file reads, but its graph is malformed: undefined inputs, a cycle, non-finite weights."""


class ModelSaveError(QCompileError):
    """The output could not be written (or would overwrite the input)."""


class DataError(QCompileError):
    """Calibration or validation data does not match the model's inputs."""


class OptionError(QCompileError):
    """An option or option combination is invalid."""


class UnsupportedModelError(QCompileError):
    """The model uses something this compiler cannot handle (opset, op, dtype)."""


class LegalityError(QCompileError):
    """An artifact breaks a rule of its target backend; raised before saving."""

    @classmethod
    def listing(cls, rules: str, problems: list[str], shown: int = 5) -> LegalityError:
        """One error naming the first `shown` problems and how many more (``artifact breaks <rules>: ...``)."""
        more = f" (+{len(problems) - shown} more)" if len(problems) > shown else ""
        return cls(f"artifact breaks {rules}: {'; '.join(problems[:shown])}{more}")


class AccuracyBudgetError(QCompileError):
    """`--max-drop` could not be met; `result` holds the best model found and its report."""

    def __init__(self, message: str, result: object) -> None:
        super().__init__(message)
        self.result = result


_STAGE = "qcompile_stage"
_NODE = "qcompile_node"


@contextlib.contextmanager
def context(*, stage: str | None = None, node: str | None = None) -> Iterator[None]:
    """Remember where an unexpected error (a bug, not a `QCompileError`) happened: the innermost stage and node.

    The CLI's one-line internal error names them, so a report of it says where to look.
    """
    try:
        yield
    except QCompileError:
        raise
    except Exception as exc:
        for key, value in ((_STAGE, stage), (_NODE, node)):
            if value is not None and getattr(exc, key, None) is None:
                with contextlib.suppress(AttributeError, TypeError):  # a few C exceptions take no attributes
                    setattr(exc, key, value)
        raise


def where(exc: BaseException) -> str:
    """`` in stage 'calibrate' at node 'fc1'`` for an error `context` saw ('' when none did)."""
    stage, node = getattr(exc, _STAGE, None), getattr(exc, _NODE, None)
    return (f" in stage {stage!r}" if stage else "") + (f" at node {node!r}" if node else "")
