"""The onnxruntime CPU backend object (`qcompiler.backend.Backend`): the registry's ``BACKEND``."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from qcompiler.backend import (
    DEFAULT_RUNNER,
    Backend,
    Capabilities,
    ModelRef,
    PathArg,
    Precision,
    Runner,
    RunnerSettings,
    SessionRunner,
)
from qcompiler.backends.onnxruntime.attention import fuse_group_query_attention
from qcompiler.backends.onnxruntime.float32_compute import compute_in_float32
from qcompiler.backends.onnxruntime.fusion import count_fusion
from qcompiler.backends.onnxruntime.legality import check, unknown_ops
from qcompiler.backends.onnxruntime.lower import lower
from qcompiler.backends.onnxruntime.lower_weights import lower_weights
from qcompiler.backends.onnxruntime.norms import fuse_rms_norms
from qcompiler.backends.onnxruntime.session import create_session, session_options
from qcompiler.io import save as save_onnx
from qcompiler.precision import model_precision as precision_of
from qcompiler.precision import reduced_activations


class OnnxRuntimeBackend(Backend):
    """onnxruntime CPU: QDQ fused into integer kernels, packed weight kernels, decoder fusions."""

    name = "onnxruntime"
    artifact_suffix = ".onnx"
    # onnxruntime CPU has FP16 kernels (or inserts Casts to FP32 around those it lacks), no BF16 ones
    capabilities = Capabilities(
        counts_fusion=True, fuses_decoder=True, precisions=frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})
    )

    def runner(self, model: ModelRef, settings: RunnerSettings = DEFAULT_RUNNER) -> Runner:
        """A CPU session (all graph optimizations; lean: no pre-packing, no arena)."""
        if settings.precision is not Precision.F32:
            raise ValueError(f"onnxruntime CPU runs f32 here, not {settings.precision.value}")
        assert isinstance(model, ir.Model | str | os.PathLike)
        options = session_options(threads=settings.threads, lean=settings.lean)
        return SessionRunner(create_session(model, options))

    def unknown_ops(self, model: ir.Model) -> list[ir.Node]:
        """Nodes with no onnxruntime CPU kernel (contrib and extensions ops included)."""
        return unknown_ops(model)

    def lower(self, model: ir.Model) -> None:
        """Requantize float consumers of output-quantized tensors, dedicate shared DQs."""
        lower(model)

    def lower_weights(
        self, model: ir.Model, accuracy_level: int = 4, int8_accuracy_level: int = 0
    ) -> dict[str, str]:
        """Canonical weights -> MatMulNBits / MatMulBnb4 / GatherBlockQuantized / our FP4 MatMul."""
        return lower_weights(model, accuracy_level, int8_accuracy_level)

    def check(self, model: ir.Model) -> None:
        """The runtime's rules as code (`legality.RULES`)."""
        check(model)

    def save(self, model: ir.Model, artifact: object | None, path: PathArg, **options: Any) -> pathlib.Path:
        """The ONNX model is the artifact (`qcompiler.io.save`, atomic)."""
        return save_onnx(model, path, **options)

    def count_fusion(self, model: ir.Model, quantized_nodes: Sequence[str]) -> dict[str, object]:
        """Classify each quantized node as fused or not from onnxruntime's optimized graph."""
        return count_fusion(model, quantized_nodes).to_dict()

    def fuse_decoder(self, model: ir.Model, *, attention: bool = True) -> dict[str, int]:
        """Decoder fusions in place; the count per kernel.

        RMSNorm -> SimplifiedLayerNormalization (exact) and, with `attention`, KV-cache attention
        -> GroupQueryAttention.
        """
        fused = {"SimplifiedLayerNormalization": fuse_rms_norms(model)}
        if attention:
            fused["GroupQueryAttention"] = fuse_group_query_attention(model)
        return {kernel: count for kernel, count in fused.items() if count}

    def finalize(self, model: ir.Model) -> list[str]:
        """An FP16 model computes in FP32, its inputs, outputs and stored weights staying FP16.

        onnxruntime's CPU kernels are FP32 (it wraps FP16 elementwise ops in Casts): SmolLM2's INT4
        decode step from the FP16 export took 13.1 ms against 8.8 ms from the FP32 one.
        """
        if not reduced_activations(model) or precision_of(model) != ir.DataType.FLOAT16:
            return []
        compute_in_float32(model)
        check(model)
        return [
            "onnxruntime CPU: the float16 model computes in float32 (inputs, outputs and stored weights stay float16)"
        ]


BACKEND = OnnxRuntimeBackend()
