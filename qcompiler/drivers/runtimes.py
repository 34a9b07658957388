"""Which runtime runs a model at each stage, as runner factories handed to core.

Calibration runs where the user asked (`CalibrationRuntime`; weight statistics default to
OpenVINO bf16, activation ranges to onnxruntime f32); a model read from OpenVINO IR keeps
OpenVINO-only ops and runs in a backend that runs OpenVINO IR whatever was asked. Every
measurement of a candidate (`--max-drop`, its proxies, the size budget's sensitivity) runs in the
target's own backend.
"""

from __future__ import annotations

import os

import onnx_ir as ir

from qcompiler import io
from qcompiler.backend import Backend, Precision, Runner, RunnerFactory, RunnerSettings
from qcompiler.calibration import RunnerMaker
from qcompiler.options import CalibrationRuntime
from qcompiler.precision import model_precision
from qcompiler.registry import backend_named

SHORT_BATCH_ROWS = 256
"""Batches with fewer rows (tokens) than this run two at a time in OpenVINO (`calibration_runners`)."""

_CALIBRATION_BACKENDS = {
    CalibrationRuntime.ONNXRUNTIME: ("onnxruntime", Precision.F32),
    CalibrationRuntime.OPENVINO: ("openvino", Precision.F32),
    CalibrationRuntime.OPENVINO_FAST: ("openvino", Precision.BF16),
}


def calibration_runners(runtime: CalibrationRuntime, source: ir.Model | None = None) -> RunnerMaker:
    """Makes the runner of each calibration piece in `runtime` (see the module docstring).

    `source`: the model being calibrated; read from OpenVINO IR, it runs in OpenVINO (f32 for
    onnxruntime's request), and so does a model of a precision the runtime cannot run (BF16 for
    onnxruntime). Precision falls back to f32 where the machine lacks bf16. Short
    batches (a sentence) run on two streams, feeds in parallel (MiniLM scale estimation:
    calibration 4.7 -> 3.7 s); long ones (512-token windows) gain nothing from it and would hold
    two batches' activations, so they keep one.
    """
    name, precision = _CALIBRATION_BACKENDS[runtime]
    backend = backend_named(name)
    if source is not None and io.source_format(source) is io.SourceFormat.OPENVINO_IR:
        if not backend.capabilities.runs_openvino_ir:
            backend, precision = _openvino_ir_backend(), Precision.F32
    elif source is not None and model_precision(source) not in backend.capabilities.precisions:
        backend, precision = _openvino_ir_backend(), Precision.F32  # a BF16 model for onnxruntime's ranges
    if not backend.supports(precision):
        precision = Precision.F32
    concurrent = (os.cpu_count() or 1) >= 2 and backend.capabilities.concurrent_streams

    def make(model: ir.Model, rows_per_batch: int) -> Runner:
        streams = 2 if concurrent and rows_per_batch < SHORT_BATCH_ROWS else 1
        return backend.runner(model, RunnerSettings(precision, streams=streams, lean=True))

    return make


def target_runners(backend: Backend) -> RunnerFactory:
    """Runs a candidate (or the float model) the way the target will: the target backend's f32 runner."""

    def make(model: ir.Model) -> Runner:
        return backend.runner(model)

    return make


def _openvino_ir_backend() -> Backend:
    return next(
        backend_named(name)
        for name, _ in _CALIBRATION_BACKENDS.values()
        if backend_named(name).capabilities.runs_openvino_ir
    )
