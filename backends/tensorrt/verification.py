"""Running TensorRT artifacts on a CPU: onnxruntime's CPU provider executes the strongly typed Q/DQ graph.

onnxruntime runs every Q/DQ form this backend emits (INT8 and FP8 per-tensor / per-channel,
INT4 blocked DequantizeLinear from opset 21, FP16 scales from 19) op by op with every graph
optimization off, so what it computes is what the graph says: the reference TensorRT's kernels
approximate. Off, not basic: onnxruntime 1.32's basic-level rewrites change the result of an FP16
graph with FP8 Q/DQ between two Convs (relative error 3.6 against 0.043 with them off, which the
onnx reference evaluator agrees with; not isolated to one rewrite). A candidate of ``--max-drop`` (a canonical FP32 Q/DQ model) is converted to
FP16 first, so the search measures the artifact it would write.
"""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qcompiler.float16_compute import QDQ_OPS, to_float16
from qcompiler.io import clone, runtime_source
from qcompiler.irutil import add_initializer, drop_if_unused
from qcompiler.precision import model_precision, numpy_type, reduced_activations


def is_quantized(model: ir.Model) -> bool:
    """Whether the graph holds a QuantizeLinear / DequantizeLinear."""
    return any(node.op_type in QDQ_OPS for node in model.graph)


def as_artifact(model: ir.Model) -> ir.Model:
    """`model` as onnxruntime can run the artifact (on a clone; `model` itself if nothing changes).

    An FP32 quantized graph is converted to FP16, FP4 weights are folded to their values.
    """
    convert = (
        is_quantized(model) and not reduced_activations(model) and model_precision(model) == ir.DataType.FLOAT
    )
    if not convert and not _fp4_weights(model):
        return model
    runnable = clone(model)
    if convert:
        to_float16(runnable)
    fold_fp4_weights(runnable)
    return runnable


def _fp4_weights(model: ir.Model) -> list[ir.Node]:
    return [
        node
        for node in model.graph
        if node.op_type == "DequantizeLinear"
        and node.inputs[0] is not None
        and node.inputs[0].dtype == ir.DataType.FLOAT4E2M1
        and node.inputs[0].const_value is not None
    ]


def _constant_float32(value: ir.Value | None) -> np.ndarray:
    assert value is not None and value.const_value is not None, "a block-scale DQ reads constants"
    return np.asarray(value.const_value.numpy()).astype(np.float32)


def fold_fp4_weights(model: ir.Model) -> int:
    """Replace each FP4 weight DQ (and the block-scale DQ feeding it) by its values, in place.

    Exact: E2M1 codes times E4M3 block scales times the FP32 tensor scale, rounded once to the
    DQ's output type, as DequantizeLinear 23 defines it (tested against onnx's reference
    evaluator). onnxruntime has no FP4 DequantizeLinear kernel; this is what lets it run the rest.
    """
    graph = model.graph
    folded = 0
    for dq in _fp4_weights(model):
        scale_value = dq.inputs[1]
        assert scale_value is not None
        scale_dq = scale_value.producer()
        if scale_dq is not None and scale_dq.op_type == "DequantizeLinear":
            block, tensor = (_constant_float32(value) for value in scale_dq.inputs[:2])
            scales = (block * tensor).astype(numpy_type(scale_value.dtype or ir.DataType.FLOAT))
        else:
            assert scale_value.const_value is not None
            scales = np.asarray(scale_value.const_value.numpy())
        codes = np.asarray(dq.inputs[0].const_value.numpy()).astype(np.float32)  # type: ignore[union-attr]
        axis = dq.attributes.get_int("axis", 1) % codes.ndim
        block_size = dq.attributes.get_int("block_size", 0)
        expanded = (
            np.repeat(scales.astype(np.float32), block_size, axis=axis)
            if block_size
            else scales.astype(np.float32)
        )
        expanded = np.take(expanded, np.arange(codes.shape[axis]), axis=axis)
        output = dq.outputs[0]
        values = add_initializer(
            graph,
            f"{dq.name}_values",
            (codes * expanded).astype(numpy_type(output.dtype or ir.DataType.FLOAT)),
        )
        output.replace_all_uses_with(values)
        constants = [value for value in dq.inputs if value is not None]
        graph.remove(dq, safe=True)
        if scale_dq is not None and not scale_dq.outputs[0].uses():
            constants += [value for value in scale_dq.inputs if value is not None]
            graph.remove(scale_dq, safe=True)
        for value in constants:
            drop_if_unused(graph, value)
        folded += 1
    return folded


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
    with runtime_source(model) as source:
        return ort.InferenceSession(source, options, providers=providers)
