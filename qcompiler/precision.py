"""A model's float precision, as a property of the model (FP32, FP16, BF16), and what follows from it.

Passes emit every new float tensor (scales, smoothing vectors, dequantized values) in the type of
the tensor it stands beside, so an FP16 model comes out FP16. Statistics are accumulated in FP32
whatever the model computes in (`as_float32`).

Weights stored in a lower precision than the graph computes in (``Constant f16 -> Convert f32``
in OpenVINO IR saved with its defaults; an FP16 initializer behind a ``Cast`` in ONNX) are read
by the passes as the float weight they decompress to: `lift_decompression` replaces each such
pair by one initializer of the computed type, converted lazily when read, that remembers its
stored type, and `restore_decompression` stores whatever is still float back in that type.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir

FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
"""The float element types every pass handles."""

REDUCED_TYPES = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
"""Float types whose Q/DQ scales need QuantizeLinear / DequantizeLinear 19."""

REDUCED_SCALE_OPSET = 19
"""The first opset whose QuantizeLinear / DequantizeLinear take FP16 / BF16 scales."""

STORED_TYPE_KEY = "qcompiler.stored_dtype"
"""`ir.Value.meta` key: the element type a lifted weight was stored in (`lift_decompression`)."""

PRECISION_KEY = "qcompiler.precision"
"""`ir.Model.metadata_props` key: the source model's precision (``float32``, ``float16``, ``bfloat16``)."""

_CONVERTS = {("", "Cast"), ("org.openvinotoolkit", "Convert")}
_OPENVINO_TYPES = {"f32": ir.DataType.FLOAT, "f16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}


def numpy_type(dtype: ir.DataType) -> np.dtype:
    """The numpy dtype arrays of `dtype` are held in (ml_dtypes' bfloat16 for BF16)."""
    if dtype == ir.DataType.BFLOAT16:
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype.numpy())


def as_type(array: np.ndarray | np.generic | float, dtype: ir.DataType | None) -> np.ndarray:
    """`array` in the float type `dtype` (FP32 when None or not a float type), rounded once."""
    target = numpy_type(dtype) if dtype in FLOAT_TYPES else np.dtype(np.float32)
    array = np.asarray(array)
    return array if array.dtype == target else array.astype(target)


def as_scale(array: np.ndarray | np.generic | float, dtype: ir.DataType | None) -> np.ndarray:
    """Positive scales in the float type `dtype`, kept inside its range (FP16: [9.5e-7, 65504]).

    A scale that underflows to 0 would divide by zero in QuantizeLinear; the floor keeps 4 bits of
    an FP16 subnormal's mantissa.
    """
    target = numpy_type(dtype) if dtype in FLOAT_TYPES else np.dtype(np.float32)
    info = ml_dtypes.finfo(target)
    clipped = np.clip(np.asarray(array, np.float32), float(info.smallest_normal) / 64, float(info.max))
    return clipped.astype(target)


def as_float32(array: np.ndarray) -> np.ndarray:
    """A runtime's output as FP32, the precision every statistic and metric is computed in."""
    if array.dtype.kind == "f" and array.dtype != np.float32 or array.dtype == ml_dtypes.bfloat16:
        return array.astype(np.float32)
    return array


def float_type_of(value: ir.Value | None) -> ir.DataType:
    """The float type a tensor computes in (FP32 for a value without one)."""
    if value is not None and value.dtype in FLOAT_TYPES:
        return value.dtype  # type: ignore[return-value]
    return ir.DataType.FLOAT


def model_precision(model: ir.Model) -> ir.DataType:
    """The precision the model's weights are stored in: the float type holding most weight bytes.

    A lifted weight counts in its stored type, so an FP16-compressed OpenVINO IR is FP16. A model
    without float weights is FP32.
    """
    sizes: collections.Counter[ir.DataType] = collections.Counter()
    for value in model.graph.initializers.values():
        stored = value.meta.get(STORED_TYPE_KEY, value.dtype)
        if stored in FLOAT_TYPES and value.const_value is not None:
            sizes[stored] += int(np.prod(value.const_value.shape.numpy() or (1,)))
    return sizes.most_common(1)[0][0] if sizes else ir.DataType.FLOAT


def precision_name(dtype: ir.DataType) -> str:
    """``float32``, ``float16`` or ``bfloat16``: how the report and the model's metadata name it."""
    return {ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}.get(dtype, "float32")


def reduced_activations(model: ir.Model) -> bool:
    """Whether the graph computes any activation in FP16 / BF16 (its Q/DQ scales then need opset 19)."""
    return any(output.dtype in REDUCED_TYPES for node in model.graph for output in node.outputs) or any(
        value.dtype in REDUCED_TYPES for value in model.graph.inputs
    )


def _cast_target(node: ir.Node) -> ir.DataType | None:
    """The float type a Cast / OpenVINO Convert node converts to (None: not a float conversion)."""
    if (node.domain, node.op_type) not in _CONVERTS:
        return None
    if node.op_type == "Cast":
        to = node.attributes.get_int("to", 0)
        dtype = ir.DataType(to) if to else None
    else:
        attribute = node.attributes.get("destination_type")
        dtype = _OPENVINO_TYPES.get(attribute.as_string()) if attribute is not None else None
    return dtype if dtype in FLOAT_TYPES else None


def lift_decompression(model: ir.Model) -> int:
    """Replace each float constant -> Cast / Convert to another float type by one lazy initializer.

    The new initializer has the converted type and the Cast's output name, converts the stored
    array when first read, and keeps the stored type in ``meta[STORED_TYPE_KEY]``. Returns the
    number of conversions lifted.
    """
    graph = model.graph
    lifted = 0
    for node in list(graph):
        target = _cast_target(node)
        source = node.inputs[0] if node.inputs else None
        if target is None or source is None or source.const_value is None or not source.is_initializer():
            continue
        if source.dtype not in FLOAT_TYPES or source.dtype == target:
            continue
        output = node.outputs[0]
        if output.is_graph_output():
            continue
        stored_tensor = source.const_value
        stored_type = source.meta.get(STORED_TYPE_KEY, source.dtype)
        shape = ir.Shape(stored_tensor.shape.numpy())
        lazy = ir.LazyTensor(
            _converter(stored_tensor, numpy_type(target)), dtype=target, shape=shape, name=str(output.name)
        )
        name = str(output.name)
        replacement = ir.Value(name=f"{name}/lifted", type=ir.TensorType(target), shape=shape)
        replacement.const_value = lazy
        replacement.meta[STORED_TYPE_KEY] = stored_type
        output.replace_all_uses_with(replacement)
        graph.remove(node, safe=True)
        if not source.uses() and not source.is_graph_output():
            graph.initializers.pop(str(source.name), None)
        replacement.name = name
        graph.register_initializer(replacement)
        lifted += 1
    return lifted


def _converter(tensor: ir.TensorProtocol, dtype: np.dtype):
    """A closure that reads `tensor` and converts it to `dtype` (for `ir.LazyTensor`)."""

    def convert() -> ir.TensorProtocol:
        return ir.tensor(np.asarray(tensor.numpy()).astype(dtype))

    return convert


ConversionMaker = Callable[[ir.Value, ir.DataType, str], ir.Node]
"""(stored weight, computed type, name) -> the node converting it: ONNX ``Cast`` by default;
the OpenVINO IR frontend makes its dialect's ``Convert``."""


def onnx_cast(value: ir.Value, dtype: ir.DataType, name: str) -> ir.Node:
    """``Cast(value, to=dtype)``."""
    return ir.node("Cast", [value], {"to": dtype}, name=name)


def restore_decompression(model: ir.Model, make: ConversionMaker = onnx_cast) -> int:
    """Store every lifted weight still read as float back in its stored type, behind a conversion.

    A weight a pass rewrote (SmoothQuant's folded scales) is rounded to the stored type once, as
    the source model stored it. Returns the number of weights restored.
    """
    graph = model.graph
    restored = 0
    for node in list(graph):
        for index, value in enumerate(node.inputs):
            if value is None or not value.is_initializer() or value.const_value is None:
                continue
            stored = value.meta.get(STORED_TYPE_KEY)
            if stored is None or value.dtype not in FLOAT_TYPES or value.dtype == stored:
                continue
            cast = _restore(graph, value, stored, node, make)
            node.replace_input_with(index, cast)  # the other readers were moved by _restore
            restored += 1
    return restored


def _restore(
    graph: ir.Graph, value: ir.Value, stored: ir.DataType, before: ir.Node, make: ConversionMaker
) -> ir.Value:
    """Replace the initializer `value` by its array in `stored` -> conversion, inserted before `before`."""
    name = str(value.name)
    array = np.asarray(value.const_value.numpy()).astype(numpy_type(stored))  # type: ignore[union-attr]
    stored_value = ir.Value(
        name=f"{name}/stored",
        type=ir.TensorType(stored),
        shape=value.shape,
        const_value=ir.tensor(array, dtype=stored, name=f"{name}/stored"),
    )
    graph.register_initializer(stored_value)
    cast = make(stored_value, value.dtype, f"{name}/Cast")  # type: ignore[arg-type]
    output = cast.outputs[0]
    output.type, output.shape = value.type, value.shape
    graph.insert_before(before, cast)
    value.replace_all_uses_with(output, replace_graph_outputs=True)
    graph.initializers.pop(name)
    output.name = name
    return output


def compute_in_float32(model: ir.Model, source: ir.DataType = ir.DataType.FLOAT16) -> int:
    """Make a `source`-precision graph compute in FP32, keeping its interface and its storage.

    For runtimes whose CPU kernels are FP32 (onnxruntime's: an FP16 decoder's decode step ran
    13 ms against the FP32 model's 9 ms, its FP16 Mul / Add / Sigmoid wrapped in Casts). Graph
    inputs and outputs keep `source` (a Cast after each input, before each output); every
    `source` initializer stays stored in `source` behind a Cast the runtime folds when it loads
    the model; every other `source` tensor, Cast target and constant attribute becomes FP32.
    Returns the number of values retyped.
    """
    graph = model.graph
    fp32 = ir.DataType.FLOAT
    interface = [index for index, value in enumerate(graph.outputs) if value.dtype == source]
    for value in list(graph.initializers.values()):
        if value.dtype == source and value.uses():
            _read_through_cast(graph, value, fp32)
    retyped = 0
    for node in list(graph):
        if (
            node.op_type == "Cast"
            and node.domain in ("", "ai.onnx")
            and node.attributes.get_int("to", 0) == source
        ):
            node.attributes["to"] = ir.AttrInt64("to", int(fp32))
        for name in ("value",):  # Constant, ConstantOfShape
            attribute = node.attributes.get(name)
            if (
                attribute is not None
                and attribute.type == ir.AttributeType.TENSOR
                and attribute.value.dtype == source
            ):
                array = np.asarray(attribute.value.numpy(), np.float32)
                node.attributes[name] = ir.AttrTensor(name, ir.tensor(array, name=attribute.value.name))
        for output in node.outputs:
            if output.dtype == source:
                output.type = ir.TensorType(fp32)  # a new type object: values may share one
                retyped += 1
    for value in list(graph.inputs):
        if value.dtype == source:
            _widen_input(graph, value, fp32)
    _drop_identity_casts(graph)  # FP16 -> FP32 islands' Casts are FP32 -> FP32 now
    for index in interface:
        value = graph.outputs[index]
        if value.producer() is not None:  # an input passed straight through kept its type
            graph.outputs[index] = _narrow_output(graph, value, source)
    return retyped


def _drop_identity_casts(graph: ir.Graph) -> None:
    """Remove each Cast to the type its input already has (its readers read the input)."""
    for node in list(graph):
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
            continue
        source, output = node.inputs[0], node.outputs[0]
        if source.dtype != node.attributes.get_int("to", 0) or output.is_graph_output():
            continue
        output.replace_all_uses_with(source)
        graph.remove(node, safe=True)


def _read_through_cast(graph: ir.Graph, value: ir.Value, dtype: ir.DataType) -> None:
    """Readers of the initializer `value` read ``Cast(value, dtype)`` instead."""
    readers = [use.node for use in value.uses()]
    first = next(node for node in graph if node in readers)
    cast = ir.node("Cast", [value], {"to": dtype}, name=f"{value.name}/compute")
    cast.outputs[0].name = f"{value.name}/float32"
    cast.outputs[0].type, cast.outputs[0].shape = ir.TensorType(dtype), value.shape
    graph.insert_before(first, cast)
    for use in list(value.uses()):
        if use.node is not cast:
            use.node.replace_input_with(use.idx, cast.outputs[0])


def _widen_input(graph: ir.Graph, value: ir.Value, dtype: ir.DataType) -> None:
    uses = list(value.uses())  # before the Cast reads it too
    cast = ir.node("Cast", [value], {"to": dtype}, name=f"{value.name}/compute")
    cast.outputs[0].name = f"{value.name}/float32"
    cast.outputs[0].type, cast.outputs[0].shape = ir.TensorType(dtype), value.shape
    graph.insert_before(next(iter(graph)), cast)
    for use in uses:
        use.node.replace_input_with(use.idx, cast.outputs[0])


def _narrow_output(graph: ir.Graph, value: ir.Value, dtype: ir.DataType) -> ir.Value:
    name = str(value.name)
    cast = ir.node("Cast", [value], {"to": dtype}, name=f"{name}/interface")
    graph.insert_after(value.producer(), cast)  # type: ignore[arg-type]
    result = cast.outputs[0]
    result.type, result.shape = ir.TensorType(dtype), value.shape
    value.name = f"{name}/float32"
    result.name = name
    return result
