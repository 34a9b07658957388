"""Creating onnxruntime CPU sessions for the onnxruntime backend (options, our FP4 op, the model source)."""

from __future__ import annotations

import pathlib

import onnx_ir as ir
import onnxruntime as ort

from qcompiler.backends.onnxruntime import fp4_matmul
from qcompiler.io import runtime_source

PROTOBUF_LIMIT = 1_800_000_000
"""Above this many weight bytes onnxruntime writes an optimized model's weights to a side file."""


def session_options(
    *,
    threads: int | None = None,
    level: str = "all",
    optimized_path: str | None = None,
    lean: bool = False,
) -> ort.SessionOptions:
    """CPU session options; `level` is one of disable, basic, extended, all.

    `lean` is for sessions that run a few batches (calibration): no pre-packed weight copies and
    no memory arena, trading a little speed for about one model size of memory.
    """
    options = ort.SessionOptions()
    # our packed-FP4 MatMul (an onnxruntime-extensions Python op); once per options object
    options.register_custom_ops_library(fp4_matmul.register())
    options.log_severity_level = 3
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if threads:
        options.intra_op_num_threads = threads
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    if lean:
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_cpu_mem_arena = False
    return options


def create_session(
    model: ir.Model | str | pathlib.Path, options: ort.SessionOptions | None = None
) -> ort.InferenceSession:
    """An InferenceSession on the CPU provider; large models go through a temporary file (`runtime_source`).

    `options` should come from `session_options` (it registers our packed-FP4 MatMul op).
    """
    options = options or session_options()
    providers = ["CPUExecutionProvider"]
    if not isinstance(model, ir.Model):
        return ort.InferenceSession(str(model), options, providers=providers)
    with runtime_source(model) as source:
        return ort.InferenceSession(source, options, providers=providers)
