"""onnxruntime CPU backend: lowering rules, legality checker, fusion counting, sessions."""

from qcompiler.backends.onnxruntime.attention import fuse_group_query_attention as fuse_attention
from qcompiler.backends.onnxruntime.fusion import FusionReport, count_fusion
from qcompiler.backends.onnxruntime.legality import check
from qcompiler.backends.onnxruntime.lower import lower
from qcompiler.backends.onnxruntime.lower_weights import lower_weights
from qcompiler.backends.onnxruntime.session import create_session, runner, session_options

__all__ = [
    "FusionReport",
    "check",
    "count_fusion",
    "create_session",
    "fuse_attention",
    "lower",
    "lower_weights",
    "runner",
    "session_options",
]
