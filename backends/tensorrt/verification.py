"""Running TensorRT artifacts on a CPU: onnxruntime's CPU provider executes the strongly typed Q/DQ graph.

onnxruntime runs every Q/DQ form this backend emits (INT8 and FP8 per-tensor / per-channel,
INT4 blocked DequantizeLinear from opset 21, FP16 scales from 19) op by op with every graph
optimization off, so what it computes is what the graph says: the reference TensorRT's kernels
approximate. Off, not basic: onnxruntime 1.24's basic-level rewrites change the result of an FP16
graph with FP8 Q/DQ between two Convs (relative error 3.6 against 0.043 with them off, which the
onnx reference evaluator agrees with; not isolated to one rewrite). A candidate of ``--max-drop`` (a canonical FP32 Q/DQ model) is converted to
FP16 first, so the search measures the artifact it would write.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qcompiler.float16_compute import QDQ_OPS, to_float16
from qcompiler.io import clone, initializer_bytes, save
from qcompiler.precision import model_precision, reduced_activations

IN_MEMORY_LIMIT = 256 * 2**20
"""Above this many weight bytes a session is built from a temporary file with external data."""


def is_quantized(model: ir.Model) -> bool:
    """Whether the graph holds a QuantizeLinear / DequantizeLinear."""
    return any(node.op_type in QDQ_OPS for node in model.graph)


def as_artifact(model: ir.Model) -> ir.Model:
    """`model` as the artifact computes it: an FP32 quantized graph converted to FP16 (on a clone)."""
    if not is_quantized(model) or reduced_activations(model) or model_precision(model) != ir.DataType.FLOAT:
        return model
    converted = clone(model)
    to_float16(converted)
    return converted


def create_session(
    model: ir.Model | str | os.PathLike[str], threads: int | None = None
) -> ort.InferenceSession:
    """A CPU session with every graph optimization off (see the module docstring)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if not isinstance(model, ir.Model):
        return ort.InferenceSession(str(model), options, providers=providers)
    if initializer_bytes(model) < IN_MEMORY_LIMIT and not any(
        isinstance(value.const_value, ir.ExternalTensor) for value in model.graph.initializers.values()
    ):
        return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=providers)
    with tempfile.TemporaryDirectory(prefix="qcompile-trt-") as folder:
        path = save(model, pathlib.Path(folder) / "model.onnx", external_data=True)
        return ort.InferenceSession(str(path), options, providers=providers)


class CpuRunner:
    """A `qcompiler.backend.Runner` over one onnxruntime CPU session of the artifact."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.output_names = [output.name for output in session.get_outputs()]

    def run(self, names: Sequence[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The named outputs for one feed."""
        return self.session.run(list(names), dict(feed))

    def run_all(
        self, names: Sequence[str], feeds: Iterable[Mapping[str, np.ndarray]]
    ) -> Iterator[list[np.ndarray]]:
        """The named outputs of each feed, in order."""
        for feed in feeds:
            yield self.run(names, feed)
