"""Creating onnxruntime CPU sessions from in-memory models (the one place that imports ORT here)."""

from __future__ import annotations

import pathlib
import tempfile

import onnx_ir as ir
import onnxruntime as ort

from qcompiler.backends.onnxruntime import fp4_matmul
from qcompiler.io import initializer_bytes, save

PROTOBUF_LIMIT = 1_800_000_000
IN_MEMORY_LIMIT = 256 * 2**20
"""Above this many weight bytes a session is built from a temporary file with external data:
serializing to bytes would hold the proto and its bytes in memory at once (2x the weights)."""


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
    """An InferenceSession on the CPU provider; models over ~1.8 GB go through a temporary file.

    `options` should come from `session_options` (it registers our packed-FP4 MatMul op).
    """
    options = options or session_options()
    providers = ["CPUExecutionProvider"]
    if not isinstance(model, ir.Model):
        return ort.InferenceSession(str(model), options, providers=providers)
    if initializer_bytes(model) < min(PROTOBUF_LIMIT, IN_MEMORY_LIMIT):
        if any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()):
            # ORT resolves external data of an in-memory model against its own working folder,
            # so lazy tensors are read in (on a clone; the caller's model stays lazy).
            model = ir.external_data.load_to_model(model.clone())
        return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=providers)
    with tempfile.TemporaryDirectory(prefix="qcompile-session-") as folder:
        path = save(model, pathlib.Path(folder) / "model.onnx", external_data=True)
        return ort.InferenceSession(str(path), options, providers=providers)
