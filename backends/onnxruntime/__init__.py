"""onnxruntime CPU backend: lowering rules, legality checker, fusion counting, sessions."""

from qcompiler.backends.onnxruntime.attention import fuse_group_query_attention
from qcompiler.backends.onnxruntime.fusion import FusionReport, count_fusion
from qcompiler.backends.onnxruntime.legality import check
from qcompiler.backends.onnxruntime.lower import lower
from qcompiler.backends.onnxruntime.lower_weights import lower_weights
from qcompiler.backends.onnxruntime.norms import fuse_rms_norms
from qcompiler.backends.onnxruntime.session import create_session, runner, session_options


def fuse_decoder(model, *, attention: bool = True) -> dict[str, int]:  # ir.Model
    """Lower a decoder to onnxruntime's fused kernels in place; returns the count per kernel.

    RMSNorm -> SimplifiedLayerNormalization (exact) and, with `attention`, KV-cache attention ->
    GroupQueryAttention.
    """
    fused = {"SimplifiedLayerNormalization": fuse_rms_norms(model)}
    if attention:
        fused["GroupQueryAttention"] = fuse_group_query_attention(model)
    return {kernel: count for kernel, count in fused.items() if count}


__all__ = [
    "FusionReport",
    "check",
    "count_fusion",
    "create_session",
    "fuse_decoder",
    "lower",
    "lower_weights",
    "runner",
    "session_options",
]
