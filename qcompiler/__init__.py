"""qcompiler: a graph-level quantization compiler for ONNX and OpenVINO IR models.

The API takes and returns models: ``qcompiler.compile(model, "ort-cpu", options, data=feeds)``
returns a `CompileResult` whose ``model`` is an ``onnx_ir.Model``; ``result.save(path)`` writes the
target's artifact.
"""

from qcompiler.drivers.pipeline import CompileResult, compile
from qcompiler.errors import AccuracyBudgetError, QCompileError
from qcompiler.io import load, save
from qcompiler.options import (
    AccuracyOptions,
    ActivationOptions,
    CalibrationOptions,
    CompileOptions,
    CompressionOptions,
    DropType,
    IgnoredScope,
    Preset,
    QuantType,
    RangeMethod,
    SmoothQuantOptions,
    WeightFormat,
    WeightOptions,
)
from qcompiler.targets import TARGETS, Target, get_target

__all__ = [
    "TARGETS",
    "AccuracyBudgetError",
    "AccuracyOptions",
    "ActivationOptions",
    "CalibrationOptions",
    "CompileOptions",
    "CompileResult",
    "CompressionOptions",
    "DropType",
    "IgnoredScope",
    "Preset",
    "QCompileError",
    "QuantType",
    "RangeMethod",
    "SmoothQuantOptions",
    "Target",
    "WeightFormat",
    "WeightOptions",
    "compile",
    "get_target",
    "load",
    "save",
]
