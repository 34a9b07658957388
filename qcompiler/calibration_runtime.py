"""Where calibration runs a model: onnxruntime, or OpenVINO (bf16 where the CPU has it).

`runner_for` gives one interface to both: (output names, feeds) -> each feed's outputs, in order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import onnx_ir as ir

from qcompiler.options import CalibrationRuntime

SHORT_BATCH_ROWS = 256
"""Batches with fewer rows (tokens) than this run two at a time in OpenVINO (`runner_for`)."""

Runner = Callable[[list[str], Iterable[Mapping[str, np.ndarray]]], Iterator[list[np.ndarray]]]


def runner_for(model: ir.Model, runtime: CalibrationRuntime, rows_per_batch: int) -> Runner:
    """A function (output names, feeds) -> each feed's outputs, in order, running `model` in the chosen runtime.

    A model read from OpenVINO IR runs in OpenVINO whatever `runtime` says (f32 for onnxruntime's).
    Short batches (a sentence) run on two OpenVINO streams, feeds in parallel, one thread each
    (MiniLM scale estimation: calibration 4.7 -> 3.7 s); long ones (512-token windows) gain
    nothing from it and would hold two batches' activations, so they keep one stream.
    """
    from qcompiler.backends.openvino.dialect import is_openvino_dialect

    if runtime is CalibrationRuntime.ONNXRUNTIME and is_openvino_dialect(model):
        runtime = CalibrationRuntime.OPENVINO
    if runtime is CalibrationRuntime.ONNXRUNTIME:
        from qcompiler.backends.onnxruntime.session import create_session, session_options

        session = create_session(model, session_options(lean=True))
        return lambda names, feeds: (session.run(names, dict(feed)) for feed in feeds)
    from qcompiler.backends.openvino import OpenVINORunner, bf16_available

    precision = "bf16" if runtime is CalibrationRuntime.OPENVINO_FAST and bf16_available() else "f32"
    streams = 2 if (os.cpu_count() or 1) >= 2 and rows_per_batch < SHORT_BATCH_ROWS else 1
    return OpenVINORunner(model, precision=precision, streams=streams).run_all
