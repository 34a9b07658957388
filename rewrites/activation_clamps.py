"""Clamping activations (Relu, Clip / ReLU6) after a quantized kernel, and when a quantizer makes one redundant.

A Conv whose fused kernel needs a quantized output (QLinearConv) and whose only reader is a clamp
should not quantize the pre-activation range: ReLU6 after a Conv whose outputs span [-100, 99]
leaves about 8 of 256 levels for [0, 6]. Its output quantizer takes the clamp's output range
instead, and when that quantizer's integer domain lies inside the clamp's interval, saturation
does the clamp's work and the clamp is dropped (what onnxruntime's ``ClipQuantFusion`` /
``ReluQuantTransformer`` and its quantizer's removable activations do). Otherwise the clamp stays
in float after the DequantizeLinear, which gives the same values.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from qcompiler.irutil import drop_if_unused
from qcompiler.numerics import type_range
from qcompiler.options import QuantType
from qcompiler.precision import FLOAT_TYPES

CLAMP_OPS = frozenset({"Relu", "Clip"})

REDUNDANCY_TOLERANCE = 1e-6
"""Relative slack on the clamp bounds (a float32 scale times 255 misses 6.0 by a few ulps)."""


def clamp_bounds(node: ir.Node) -> tuple[float, float] | None:
    """The interval a Relu or a Clip with constant (or absent) bounds clamps to, else None."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in CLAMP_OPS:
        return None
    if node.op_type == "Relu":
        return 0.0, math.inf
    bounds = []
    for index, default in ((1, -math.inf), (2, math.inf)):
        value = node.inputs[index] if len(node.inputs) > index else None
        if value is None:
            bounds.append(default)
        elif value.const_value is None or value.const_value.size != 1:
            return None
        else:
            bounds.append(float(value.const_value.numpy().reshape(())))
    return bounds[0], bounds[1]


def output_clamp(node: ir.Node) -> ir.Node | None:
    """The clamp that is the only reader of `node`'s output, when its result is an inner float tensor."""
    output = node.outputs[0]
    uses = list(output.uses())
    if output.is_graph_output() or len(uses) != 1 or uses[0].idx != 0:
        return None
    clamp = uses[0].node
    result = clamp.outputs[0]
    if clamp_bounds(clamp) is None or result.is_graph_output() or result.dtype not in FLOAT_TYPES:
        return None
    return clamp


def makes_redundant(
    bounds: tuple[float, float], scale: np.ndarray | float, zero_point: int, qtype: QuantType
) -> bool:
    """Whether a quantizer's dequantized domain [s (qmin - z), s (qmax - z)] lies inside `bounds`.

    `scale` is the stored scale (in the graph's float type), since that is what saturates.
    """
    qmin, qmax = type_range(qtype)
    step = float(np.asarray(scale, np.float64))
    low, high = bounds
    return step * (qmin - zero_point) >= low - _slack(low) and step * (qmax - zero_point) <= high + _slack(
        high
    )


def _slack(bound: float) -> float:
    """`REDUNDANCY_TOLERANCE` relative to a finite bound (absolute near 0); an infinite one needs none."""
    return REDUNDANCY_TOLERANCE * max(1.0, abs(bound)) if math.isfinite(bound) else 0.0


def remove_clamp(graph: ir.Graph, clamp: ir.Node) -> None:
    """Drop `clamp` and its bound constants; its readers read its input, which takes its tensor name."""
    source, result, bounds = clamp.inputs[0], clamp.outputs[0], clamp.inputs[1:]
    assert source is not None
    name = result.name
    result.replace_all_uses_with(source)
    graph.remove(clamp, safe=True)
    source.name = name
    for value in bounds:
        if value is not None:
            drop_if_unused(graph, value)
