"""Fold per-channel affine ops that follow a Conv into its weight and bias.

Exporters (Paddle2ONNX above all) write a Conv without bias, then ``Add`` of a [1, C, 1, 1] bias,
then the scalar ``Mul`` / ``Add`` of a learnable affine block, or an unfused BatchNormalization.
Quantized as written, the Conv's output quantizer sees the pre-bias tensor: one per-tensor range
over channels whose offsets differ by more than their spread, and the bias runs in float after
the int8 kernel. Folded, the Conv computes the same function (up to float rounding), its bias
goes into the int32 bias of the quantized kernel, and its output quantizer measures the tensor
the next op actually reads.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.irutil import add_initializer
from qcompiler.precision import FLOAT_TYPES, STORED_TYPE_KEY

FOLDABLE = frozenset({"Add", "Sub", "Mul", "Div", "BatchNormalization"})


class FoldConvAffinePass(ir.passes.InPlacePass):
    """Fold ``Conv -> Add / Sub / Mul / Div (per-channel constant) -> ...`` and BatchNormalization.

    A follower is folded only when it is the single reader of the tensor before it, that tensor is
    not a graph output, the weight (and bias) are constants, and the constant broadcasts per output
    channel. BatchNormalization is handled here rather than by onnxscript's
    ``fuse_batchnorm_into_conv_rule``: that rule is not in the optimizer's default set (PP-OCRv5 cls
    keeps all 27 after it) and writes its weight without the stored FP16 type.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Fold every chain; `modified` says whether any op was folded."""
        folded = sum(
            _fold_followers(model.graph, node)
            for node in list(model.graph)
            if node.op_type == "Conv" and node.domain in ("", "ai.onnx")
        )
        return ir.passes.PassResult(model, modified=folded > 0)


def _per_channel(value: ir.Value | None, channels: int, rank: int) -> np.ndarray | None:
    """A constant that broadcasts over a [N, channels, ...] tensor of `rank` along axis 1 only, as [channels]."""
    if value is None or value.const_value is None or value.dtype not in FLOAT_TYPES:
        return None
    array = value.const_value.numpy().astype(np.float64)
    if array.ndim > rank:
        return None
    shape = (1,) * (rank - array.ndim) + array.shape
    if any(size != 1 for axis, size in enumerate(shape) if axis != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(array.reshape(-1), (channels,)).copy()


def _fold_followers(graph: ir.Graph, conv: ir.Node) -> int:
    """Fold the chain of affine ops after `conv` into its weight and bias, written once; how many."""
    output = conv.outputs[0]
    weight = conv.inputs[1] if len(conv.inputs) > 1 else None
    bias = conv.inputs[2] if len(conv.inputs) > 2 else None
    if (
        weight is None
        or weight.const_value is None
        or weight.dtype not in FLOAT_TYPES
        or (bias is not None and bias.const_value is None)
    ):
        return 0
    dims = weight.const_value.shape.numpy()
    channels, rank = dims[0], len(dims)
    scale, offset = np.ones(channels), np.zeros(channels)
    followers: list[ir.Node] = []
    tail = output
    while not tail.is_graph_output() and len(uses := list(tail.uses())) == 1:
        follower = uses[0].node
        if (
            follower.op_type not in FOLDABLE
            or follower.domain not in ("", "ai.onnx")
            or len(follower.outputs) != 1
        ):
            break
        affine = _affine(follower, uses[0].idx, channels, rank)
        if affine is None:
            break
        scale, offset = scale * affine[0], offset * affine[0] + affine[1]
        followers.append(follower)
        tail = follower.outputs[0]
    if not followers:
        return 0
    kernel = weight.const_value.numpy().astype(np.float64) * scale.reshape((-1,) + (1,) * (rank - 1))
    shift = offset if bias is None else bias.const_value.numpy().astype(np.float64) * scale + offset  # type: ignore[union-attr]
    conv.replace_input_with(1, _replacement(graph, weight, kernel, f"{weight.name}_folded"))
    if bias is None:
        conv.resize_inputs(3)
    conv.replace_input_with(
        2, _replacement(graph, weight, shift, f"{bias.name}_folded" if bias else f"{conv.name}_bias")
    )
    constants = [weight, bias, *(value for node in followers for value in node.inputs)]
    name = tail.name
    tail.replace_all_uses_with(output, replace_graph_outputs=True)
    graph.remove(followers, safe=True)
    output.name = name  # readers, graph outputs and reports keep the last follower's tensor name
    for old in constants:
        if (
            old is not None
            and old.const_value is not None
            and not old.uses()
            and old.name in graph.initializers
        ):
            del graph.initializers[str(old.name)]
    return len(followers)


def _affine(
    follower: ir.Node, position: int, channels: int, rank: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """The follower as y -> scale * y + offset per channel, or None when it is not that."""
    if follower.op_type == "BatchNormalization":
        if position != 0 or follower.attributes.get_int("training_mode", False):
            return None
        # [C] parameters: as a [1, C] tensor's per-channel constant
        gamma, beta, mean, variance = (_per_channel(v, channels, 2) for v in follower.inputs[1:5])
        if gamma is None or beta is None or mean is None or variance is None:
            return None
        scale = gamma / np.sqrt(variance + follower.attributes.get_float("epsilon", 1e-5))
        return scale, beta - mean * scale
    other = follower.inputs[1 - position]
    constant = _per_channel(other, channels, rank)
    if constant is None:
        return None
    ones, zeros = np.ones(channels), np.zeros(channels)
    if follower.op_type == "Add":
        return ones, constant
    if follower.op_type == "Mul":
        return constant, zeros
    if position != 0:  # c - y, c / y: not affine in y (or not handled)
        return None
    if follower.op_type == "Sub":
        return ones, -constant
    if np.any(constant == 0):
        return None
    return 1.0 / constant, zeros  # Div


def _replacement(graph: ir.Graph, like: ir.Value, array: np.ndarray, name: str) -> ir.Value:
    """A new initializer `name` in `like`'s type (and stored type) holding `array`."""
    dtype = like.dtype
    assert dtype is not None
    value = add_initializer(graph, name, array.astype(dtype.numpy()))
    if STORED_TYPE_KEY in like.meta:
        value.meta[STORED_TYPE_KEY] = like.meta[STORED_TYPE_KEY]
    return value
