"""Lowering the canonical graph to an `openvino.Model` with compressed weights.

Activations: OpenVINO's ONNX frontend turns each QuantizeLinear -> DequantizeLinear pair into a
FakeQuantize, which its CPU/GPU plugins run as int8 kernels; that route is kept.

Weights: every canonical weight DequantizeLinear (`canonical_consumer`: constant codes feeding a
MatMul's weight or a Gather's table, INT8 static weights included) is *not* given to the frontend,
which misreads FP8 initializers stored as ``int32_data`` and silently accepts malformed packing.
The weight becomes a graph input of the ONNX handed to ``convert_model``; afterwards that
Parameter is replaced by the decompression subgraph OpenVINO's plugins run as a compressed
FullyConnected (the form NNCF emits)::

    Constant u8/i8/u4/i4/nf4/f4e2m1/f8e4m3 [N, groups, g] -> Convert -> [Subtract zero point]
        -> Multiply scale [N, groups, 1] -> Reshape [N, K] -> [Convert f32] -> MatMul(transpose_b)

with the weight stored output-channel first ([N, K]); an embedding table [V, H] is read by its
Gather in the same layout. Per-channel weights skip the Reshape.
"""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qcompiler.backends.openvino.dialect import to_openvino_model
from qcompiler.canonical import COMPRESSION_KEY, canonical_consumer, read_canonical
from qcompiler.frontends.openvino_ir import is_openvino_dialect
from qcompiler.io import save
from qcompiler.irutil import drop_if_unused
from qcompiler.options import WeightFormat
from qcompiler.weight_formats import CompressedWeight, pack_nibbles, to_blocks

WEIGHT_INPUT_PREFIX = "qcompiler.weight::"
"""Name prefix of the Parameters that stand in for compressed weights during conversion."""

COMPRESSION_RT_KEY = "qcompiler_compression"
"""rt_info key on a MatMul / Gather holding how its weight was compressed (shown by Netron)."""

CODE_ELEMENT_TYPES: dict[ir.DataType, str] = {
    ir.DataType.INT8: "i8",
    ir.DataType.UINT8: "u8",
    ir.DataType.INT4: "i4",
    ir.DataType.UINT4: "u4",
    ir.DataType.FLOAT4E2M1: "f4e2m1",
    ir.DataType.FLOAT8E4M3FN: "f8e4m3",
}
"""OpenVINO's name of each ONNX code type (the formats' code types come from `qcompiler.formats`)."""


@dataclasses.dataclass(frozen=True)
class DetachedWeight:
    """A compressed weight taken out of the graph before conversion.

    Attributes:
        parameter: the name of the graph input standing in for its float values.
        weight: the codes, scales and zero points, as [K, N].
        how: the compression metadata of its DequantizeLinear ("" for a static INT8 weight).
    """

    parameter: str
    weight: CompressedWeight
    how: str


def element_type(weight: CompressedWeight) -> str:
    """The OpenVINO element type name of `weight`'s codes (NF4's table indices have their own type)."""
    if weight.format is WeightFormat.NF4:
        return "nf4"
    signed = not weight.format.is_integer or weight.codes.dtype == np.int8
    return CODE_ELEMENT_TYPES[weight.format.spec.code_type(symmetric=signed)]


def to_openvino(model: ir.Model, *, decompression: str = "f32") -> object:  # -> openvino.Model
    """Convert `model` (the canonical QDQ / compressed form) to an `openvino.Model`.

    `model` is not modified. `decompression` is the float type the weight subgraphs compute in
    ("f32" for CPU; "f16" for GPU / NPU, which round the scales to f16).
    """
    import openvino as ov

    stripped, detached = detach_weights(model)
    if is_openvino_dialect(stripped):  # read from OpenVINO IR: built op by op
        converted = to_openvino_model(stripped)
    else:
        converted = _convert_onnx(stripped)
    del stripped
    parameters = {parameter.get_friendly_name(): parameter for parameter in converted.get_parameters()}
    for item in detached:
        parameter = parameters[item.parameter]
        attach_weight(parameter, item, getattr(ov.Type, decompression))
        converted.remove_parameter(parameter)
    converted.validate_nodes_and_infer_types()
    for key, value in model.metadata_props.items():
        converted.set_rt_info(value, ["qcompiler", key.removeprefix("qcompiler.")])
    return converted


def _convert_onnx(model: ir.Model):  # -> openvino.Model
    """`model` (ONNX ops only) through OpenVINO's ONNX frontend."""
    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="qcompile-openvino-") as folder:
        path = save(model, pathlib.Path(folder) / "model.onnx", external_data=True)
        if any(node.op_type == "QuantizeLinear" for node in model.graph):
            # convert_model's transformations turn each Q -> DQ pair (a shared Q too) into a FakeQuantize
            return ov.convert_model(str(path))
        # weights only: the frontend alone (SmolLM2: 0.05 s vs 1.5 s); the plugin transforms at compile
        return ov.Core().read_model(str(path))


def detach_weights(model: ir.Model) -> tuple[ir.Model, list[DetachedWeight]]:
    """A clone of `model` whose canonical weight DQs are graph inputs, and what they held.

    The clone shares `model`'s tensors; only the graph structure is copied.
    """
    clone = model.clone()
    detached = []
    for dq in list(clone.graph):
        if canonical_consumer(dq) is None:
            continue
        weight = _without_zero_offsets(read_canonical(dq))
        output = dq.outputs[0]
        name = f"{WEIGHT_INPUT_PREFIX}{output.name}"
        stand_in = ir.Value(name=name, type=output.type, shape=output.shape)
        output.replace_all_uses_with(stand_in)
        clone.graph.inputs.append(stand_in)
        constants = [value for value in dq.inputs if value is not None]
        clone.graph.remove(dq, safe=True)
        for value in constants:
            drop_if_unused(clone.graph, value)
        detached.append(DetachedWeight(name, weight, dq.metadata_props.get(COMPRESSION_KEY, "")))
    return clone, detached


def _without_zero_offsets(weight: CompressedWeight) -> CompressedWeight:
    """A signed INT8 weight with explicit all-zero zero points (static QDQ) is symmetric."""
    if weight.zero_points is not None and weight.codes.dtype == np.int8 and not weight.zero_points.any():
        return dataclasses.replace(weight, zero_points=None)
    return weight


def _constant(array: np.ndarray, type_name: str):  # -> openvino.op.Constant
    """A Constant of a (possibly sub-byte) OpenVINO element type from its codes."""
    import openvino as ov

    ov_type = getattr(ov.Type, type_name)
    data = (
        pack_nibbles(np.ascontiguousarray(array).reshape(-1))
        if ov_type.bitwidth == 4
        else np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    )
    tensor = ov.Tensor(ov_type, ov.Shape(list(array.shape)))  # owns its memory; `data` is freed after
    tensor.data.reshape(-1)[:] = data
    return ov.op.Constant(tensor, shared_memory=False)


def output_major(weight: CompressedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Codes [N, groups, g] (or [N, K] per channel), scales and zero points [N, groups, 1] (or [N, 1])."""
    rows = weight.shape[0]
    per_channel = weight.block_size >= rows
    if per_channel:
        codes = weight.codes.T
        scales = weight.scales.T
        zeros = None if weight.zero_points is None else weight.zero_points.T
    else:
        codes = to_blocks(weight.codes, weight.block_size).transpose(2, 0, 1)
        scales = weight.scales.T[..., None]
        zeros = None if weight.zero_points is None else weight.zero_points.T[..., None]
    return np.ascontiguousarray(codes), np.ascontiguousarray(scales), zeros


def decompression_subgraph(
    weight: CompressedWeight, precision, name: str, output_type=None
):  # -> openvino.Output
    """The weight's float values [N, K] computed from its compressed constant.

    `precision`: the type the device decompresses in; `output_type`: the type the model computes
    in (the weight's own: f16 for an FP16 model; default f32).
    """
    import openvino as ov
    import openvino.opset13 as ops

    rows, columns = weight.shape
    output_type = output_type or ov.Type.f32
    if output_type in (ov.Type.f16, ov.Type.bf16):  # FP16 / BF16 model: scales in its type (NNCF's pattern)
        precision = output_type
    type_name = element_type(weight)
    codes, scales, zeros = output_major(weight)
    compressed = _constant(codes, type_name)
    compressed.set_friendly_name(f"{name}/compressed")
    values = ops.convert(compressed, precision)
    if zeros is not None:
        zero_points = _constant(zeros.astype(codes.dtype), type_name)
        zero_points.set_friendly_name(f"{name}/zero_point")
        values = ops.subtract(values, ops.convert(zero_points, precision))
    if precision == ov.Type.bf16:  # numpy has no bf16 for ops.constant: the bits, as a bf16 tensor
        tensor = ov.Tensor(ov.Type.bf16, ov.Shape(list(scales.shape)))
        tensor.data.view(np.uint16)[...] = scales.astype(ml_dtypes.bfloat16).view(np.uint16)
        scale = ov.op.Constant(tensor, shared_memory=False)
    else:
        scale = ops.constant(scales.astype(np.float16 if precision == ov.Type.f16 else np.float32))
    scale.set_friendly_name(f"{name}/scale")
    values = ops.multiply(values, scale)
    if codes.ndim == 3:
        padded = codes.shape[1] * codes.shape[2]
        values = ops.reshape(values, ops.constant(np.array([columns, padded], np.int64)), False)
        if padded != rows:  # the last block was zero-padded
            values = ops.slice(
                values,
                ops.constant(np.array([0], np.int64)),
                ops.constant(np.array([rows], np.int64)),
                ops.constant(np.array([1], np.int64)),
                ops.constant(np.array([1], np.int64)),
            )
    if precision != output_type:
        values = ops.convert(values, output_type)
    return values.output(0)


def attach_weight(parameter, item: DetachedWeight, precision) -> None:
    """Feed every reader of `parameter` from the decompression subgraph of `item`'s weight.

    A MatMul reading it as its second input is rebuilt with ``transpose_b`` (the weight is stored
    [N, K]); a Gather reads the [V, H] table directly; anything else gets a Transpose back to [K, N].
    """
    import openvino.opset13 as ops

    name = item.parameter.removeprefix(WEIGHT_INPUT_PREFIX)
    values = decompression_subgraph(item.weight, precision, name, parameter.get_output_element_type(0))
    for target in list(parameter.output(0).get_target_inputs()):
        reader = target.get_node()
        kind = reader.get_type_name()
        if kind == "MatMul" and target.get_index() == 1 and not reader.get_attributes()["transpose_b"]:
            attributes = reader.get_attributes()
            matmul = ops.matmul(reader.input_value(0), values, attributes["transpose_a"], True)
            matmul.set_friendly_name(reader.get_friendly_name())
            reader.output(0).replace(matmul.output(0))
            if item.how:
                matmul.get_rt_info()[COMPRESSION_RT_KEY] = item.how
        elif kind == "Gather" and target.get_index() == 0:
            target.replace_source_output(values)
            if item.how:
                reader.get_rt_info()[COMPRESSION_RT_KEY] = item.how
        else:
            target.replace_source_output(
                ops.transpose(values, ops.constant(np.array([1, 0], np.int64))).output(0)
            )
