"""OpenVINO backend: lowering to `openvino.Model`, its checker per device, saving, running on CPU.

The pipeline calls the same functions on every backend: `lower` / `lower_weights` bring the
canonical graph into the backend's form (here it stays canonical: the conversion happens once, in
`export`), `check` validates it, `runner` evaluates a candidate in the target's runtime, and
`export` builds and checks the artifact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qcompiler.backends.openvino.checker import check as check_artifact
from qcompiler.backends.openvino.lower import (
    detach_weights,
    element_type,
    to_openvino,
)
from qcompiler.backends.openvino.runtime import OpenVINORunner, bf16_available
from qcompiler.backends.openvino.save import save_openvino
from qcompiler.canonical import canonical_consumer, read_canonical
from qcompiler.targets import Target

__all__ = [
    "OpenVINORunner",
    "bf16_available",
    "check",
    "check_artifact",
    "detach_weights",
    "export",
    "lower",
    "lower_weights",
    "runner",
    "save_openvino",
    "to_openvino",
]


def lower(model: ir.Model) -> None:
    """Nothing to rewrite: OpenVINO's frontend turns each Q -> DQ pair into a FakeQuantize."""


def lower_weights(model: ir.Model, accuracy_level: int = 4, int8_accuracy_level: int = 0) -> dict[str, str]:
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


def check(model: ir.Model) -> None:
    """The canonical graph needs no backend-specific form; the artifact is checked by `export`."""


def export(model: ir.Model, target: Target) -> tuple[object, list[str]]:
    """The checked `openvino.Model` for `target`, and the checker's warnings."""
    converted = to_openvino(model, decompression=target.decompression)
    converted.set_rt_info(target.inference_precision, ["qcompiler", "inference_precision"])
    warnings = check_artifact(converted, target)
    return converted, warnings


def runner(model: ir.Model) -> Callable[[Sequence[str], Mapping[str, np.ndarray]], list[np.ndarray]]:
    """Run `model` as its OpenVINO artifact on CPU (f32), as the fallback's evaluator does."""
    return OpenVINORunner(to_openvino(model)).run
