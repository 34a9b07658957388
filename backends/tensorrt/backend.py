"""The TensorRT backend object (`qcompiler.backend.Backend`): the registry's ``BACKEND``.

The artifact is ONNX for TensorRT's parser: explicit Q/DQ (INT8 / FP8 symmetric, per-tensor
activations, per-channel weights), compressed weights as low-bit initializers behind their DQ,
and the unquantized part in FP16 (`finalize`), since TensorRT 10.x/11.x networks are strongly
typed and would run an FP32 remainder in FP32.
"""

from __future__ import annotations

import os
import pathlib
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
from qcompiler.backends.tensorrt import legality
from qcompiler.backends.tensorrt.lower_weights import lower_weights
from qcompiler.backends.tensorrt.verification import as_artifact, create_session
from qcompiler.float16_compute import to_float16
from qcompiler.io import load
from qcompiler.io import save as save_onnx
from qcompiler.precision import model_precision, reduced_activations


class TensorRTBackend(Backend):
    """TensorRT explicit quantization, verified on onnxruntime's CPU provider."""

    name = "tensorrt"
    artifact_suffix = ".onnx"
    # The CPU verification runs FP32 and FP16 graphs (onnxruntime CPU has no BF16 kernels).
    capabilities = Capabilities(precisions=frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16}))

    def runner(self, model: ModelRef, settings: RunnerSettings = DEFAULT_RUNNER) -> Runner:
        """An onnxruntime CPU session of the artifact (`verification.as_artifact`: FP16, FP4 weights folded)."""
        if settings.precision is not Precision.F32:
            raise ValueError(f"the TensorRT CPU verification runs f32 here, not {settings.precision.value}")
        if isinstance(model, str | os.PathLike):  # a saved artifact may hold FP4 weights to fold
            model = load(model)
        if isinstance(model, ir.Model):
            model = as_artifact(model)
        assert isinstance(model, ir.Model | str | os.PathLike)
        return SessionRunner(create_session(model, settings.threads))

    def lower_weights(
        self, model: ir.Model, accuracy_level: int = 4, int8_accuracy_level: int = 0
    ) -> dict[str, str]:
        """The canonical weight DQs are TensorRT's form: checked, kept (accuracy levels do not apply)."""
        return lower_weights(model)

    def check(self, model: ir.Model) -> None:
        """The parser's structural rules (`legality.RULES`)."""
        legality.check(model)

    def finalize(self, model: ir.Model) -> list[str]:
        """An FP32 model computes in FP16 (strongly typed); then every rule and onnx's full check."""
        lines = []
        if model_precision(model) == ir.DataType.FLOAT and not reduced_activations(model):
            lines.append(f"tensorrt: {to_float16(model).line}")
        model.ir_version = max(model.ir_version or 0, legality.required_ir_version(model))
        legality.check(model, strongly_typed=True)
        return lines

    def save(self, model: ir.Model, artifact: object | None, path: PathArg, **options: Any) -> pathlib.Path:
        """The ONNX model is the artifact (`qcompiler.io.save`, atomic)."""
        return save_onnx(model, path, **options)


BACKEND = TensorRTBackend()
