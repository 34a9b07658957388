"""The OpenVINO backend object (`qcompiler.backend.Backend`): the registry's ``BACKEND``.

The canonical graph stays as it is through `lower` / `lower_weights` / `check`: the conversion
to an `openvino.Model` happens once, in `export`, which also checks the artifact per device.
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
    is_standard_op,
)
from qcompiler.backends.openvino.checker import check as check_artifact
from qcompiler.backends.openvino.lower import element_type, to_openvino
from qcompiler.backends.openvino.runtime import OpenVINORunner, bf16_available
from qcompiler.backends.openvino.save import save_openvino
from qcompiler.canonical import canonical_consumer, read_canonical
from qcompiler.errors import ModelSaveError
from qcompiler.io import SourceFormat, source_format
from qcompiler.precision import PRECISION_KEY
from qcompiler.targets import Target

CONVERTED_DOMAINS = frozenset({"com.microsoft", "org.openvinotoolkit"})
"""Non-standard ONNX domains OpenVINO's ONNX frontend converts ops of (it says which it lacks)."""

_LOWERED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DequantizeNF4"})
"""Ops a model must be lowered for (`to_openvino`) before OpenVINO runs it."""


class OpenVINOBackend(Backend):
    """OpenVINO CPU / GPU / NPU: FakeQuantize activations, compressed-constant weights, IR artifacts."""

    name = "openvino"
    artifact_suffix = ".xml"
    capabilities = Capabilities(runs_openvino_ir=True, concurrent_streams=True, artifact_is_onnx=False)

    def runner(self, model: ModelRef, settings: RunnerSettings = DEFAULT_RUNNER) -> Runner:
        """OpenVINO CPU; a quantized `ir.Model` runs as its lowered artifact (what `export` makes)."""
        if isinstance(model, ir.Model) and any(node.op_type in _LOWERED_OPS for node in model.graph):
            model = to_openvino(model)
        elif isinstance(model, str | os.PathLike):
            import openvino as ov

            model = ov.Core().read_model(str(model))
        return OpenVINORunner(
            model, precision=settings.precision.value, threads=settings.threads, streams=settings.streams
        )

    def unknown_ops(self, model: ir.Model) -> list[ir.Node]:
        """ONNX nodes outside the standard and the domains OpenVINO converts; IR is OpenVINO's own."""
        if source_format(model) is SourceFormat.OPENVINO_IR:
            return []
        return [
            node for node in model.graph if not (is_standard_op(node) or node.domain in CONVERTED_DOMAINS)
        ]

    def supports(self, precision: Precision) -> bool:
        """bf16 where the CPU has it (AMX / AVX512-BF16)."""
        return precision is Precision.F32 or bf16_available()

    def lower_weights(
        self, model: ir.Model, accuracy_level: int = 4, int8_accuracy_level: int = 0
    ) -> dict[str, str]:
        """The canonical weights stay as they are until `export`; returns reader -> element type.

        The accuracy levels are onnxruntime's and do not apply (OpenVINO CPU picks its own dynamic
        quantization of activations for compressed weights).
        """
        kernels = {}
        for node in model.graph:
            reader = canonical_consumer(node)
            if reader is not None:
                kernels[str(reader.name)] = f"compressed {element_type(read_canonical(node))}"
        return kernels

    def export(self, model: ir.Model, target: Target) -> tuple[object | None, list[str]]:
        """The checked `openvino.Model` for `target`, and the checker's warnings."""
        decompression = target.decompression
        if model.metadata_props.get(PRECISION_KEY) == "float16":  # NNCF's pattern for FP16 models
            decompression = "f16"
        converted = to_openvino(model, decompression=decompression)
        converted.set_rt_info(target.inference_precision, ["qcompiler", "inference_precision"])
        warnings = check_artifact(converted, target)
        return converted, warnings

    def save(self, model: ir.Model, artifact: object | None, path: PathArg, **options: Any) -> pathlib.Path:
        """``.xml`` + ``.bin`` (atomic); the artifact `export` made (``external_data`` does not apply)."""
        if artifact is None:
            raise ModelSaveError(f"{path}: nothing to save: the OpenVINO model was not exported")
        return save_openvino(artifact, path, protected=options.get("protected", ()))


BACKEND = OpenVINOBackend()
