"""Empirical bias correction: fold the mean shift a Conv's quantizers add to its output into its bias.

Rounding weights and clipping activations move each output channel's mean (Nagel et al., "Data-Free
Quantization Through Weight Equalization and Bias Correction", section 4.2; NNCF runs its fast
variant by default); depthwise layers with few weights per channel are hit hardest. As in NNCF's
fast bias correction, each layer is corrected for its own quantizers given the input it really
sees in the quantized model: one calibration run of the QDQ model measures, per input channel,
the mean of the float tensor before the layer's input quantizer (x) and after it (Q(x)). A Conv
is linear, so the shift of output channel c is

    shift_c = sum_k Wq_sum[c, k] * E[Q(x)_k] - W_sum[c, k] * E[x_k]

with W_sum the float kernel and Wq_sum the dequantized kernel summed over their spatial taps
(positions in the zero padding read 0 in both, since every range holds 0 exactly). The bias
becomes b - shift: new int32 codes where the bias is an int32 DequantizeLinear (ORT's QLinearConv),
else a new float constant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from qcompiler.calibration import Statistics, StatKind, StatRequest
from qcompiler.irutil import add_initializer, dequantized_source, drop_if_unused
from qcompiler.numerics import dequantize
from qcompiler.rewrites.placement import QuantizedUnit
from qcompiler.rewrites.qdq import ActivationQuantizer

CORRECTED_OPS = frozenset({"Conv"})


@dataclasses.dataclass(frozen=True)
class CorrectionSite:
    """One Conv whose bias is corrected, found in the QDQ model."""

    node: ir.Node
    float_weight: ir.TensorProtocol
    """The kernel as it was before QDQ replaced it (read when the shift is computed)."""
    quantized_input: ir.Value
    """A DequantizeLinear output of x's quantizer: Q(x) (the first one, so Convs sharing x share it)."""
    float_input: ir.Value
    """The tensor its QuantizeLinear reads: x."""
    bounds: tuple[float, float] | None = None
    """The interval of a Relu / Clip the quantizer replaced: the float layer read clamp(x)."""

    def requests(self) -> list[StatRequest]:
        """Per-channel means of x (clamped where a clamp was folded) and Q(x), channels on axis 1."""
        return [
            StatRequest(self.float_input, StatKind.MEAN_PER_CHANNEL, axis=1, bounds=self.bounds),
            StatRequest(self.quantized_input, StatKind.MEAN_PER_CHANNEL, axis=1),
        ]


def float_weights(units: list[QuantizedUnit]) -> dict[str, ir.TensorProtocol]:
    """The float kernels of the units bias correction can treat, kept before QDQ replaces them.

    The tensors themselves: nothing is copied until a shift is computed.
    """
    kept = {}
    for unit in units:
        weight = unit.node.inputs[unit.weight_input] if unit.weight_input is not None else None
        if unit.node.op_type in CORRECTED_OPS and unit.activation_inputs == (0,) and weight is not None:
            assert weight.const_value is not None
            kept[str(unit.node.name)] = weight.const_value
    return kept


def correction_sites(
    units: list[QuantizedUnit],
    weights: Mapping[str, ir.TensorProtocol],
    quantizers: Mapping[str, ActivationQuantizer],
) -> tuple[list[CorrectionSite], dict[str, str]]:
    """The sites in the QDQ model, and why each other unit with a float kernel is left alone.

    `quantizers`: the activation quantizers InsertQDQ chose, by tensor name (for folded clamps).
    """
    sites, skipped = [], {}
    for unit in units:
        name = str(unit.node.name)
        if name not in weights:
            continue
        node = unit.node
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        source = dequantized_source(node.inputs[0])
        if bias is None:
            skipped[name] = "no bias input"
        elif source is None:
            skipped[name] = "input is not quantized in the model"
        else:
            q = node.inputs[0].producer().inputs[0].producer()  # type: ignore[union-attr]
            quantized = q.outputs[0].uses()[0].node.outputs[0]  # type: ignore[union-attr]
            chosen = quantizers.get(str(source.name))
            bounds = chosen.folded_bounds if chosen is not None else None
            sites.append(CorrectionSite(node, weights[name], quantized, source, bounds))
    return sites, skipped


def output_shift(site: CorrectionSite, statistics: Statistics) -> np.ndarray:
    """The mean shift per output channel that the layer's quantizers add (float64)."""
    node = site.node
    groups = node.attributes.get_int("group", 1)
    mean_x = np.asarray(statistics[site.requests()[0]], np.float64)
    mean_q = np.asarray(statistics[site.requests()[1]], np.float64)
    kernel = np.asarray(site.float_weight.numpy(), np.float64)
    float_sum = kernel.reshape(kernel.shape[:2] + (-1,)).sum(-1)  # [M, C/g]
    quantized_sum = _dequantized_weight(node).astype(np.float64).reshape(float_sum.shape + (-1,)).sum(-1)
    outputs, per_group = float_sum.shape
    group_of = np.arange(outputs) // (outputs // groups)
    channels = group_of[:, None] * per_group + np.arange(per_group)[None, :]  # [M, C/g] input channel
    return (quantized_sum * mean_q[channels]).sum(1) - (float_sum * mean_x[channels]).sum(1)


def apply(graph: ir.Graph, site: CorrectionSite, shift: np.ndarray) -> None:
    """Subtract `shift` from the site's bias (int32 codes or float constant)."""
    node = site.node
    bias = node.inputs[2]
    assert bias is not None
    dq = bias.producer()
    if dq is not None and dq.op_type == "DequantizeLinear":
        codes, scales = dq.inputs[0], dq.inputs[1]
        assert (
            codes is not None
            and codes.const_value is not None
            and scales is not None
            and scales.const_value is not None
        )
        step = np.asarray(scales.const_value.numpy(), np.float64)
        info = np.iinfo(np.int32)
        corrected = np.clip(np.rint(codes.const_value.numpy() - shift / step), info.min, info.max).astype(
            np.int32
        )
        replacement = add_initializer(graph, f"{codes.name}_corrected", corrected)
        dq.replace_input_with(0, replacement)
        drop_if_unused(graph, codes)
        return
    assert bias.const_value is not None and bias.dtype is not None
    value = np.asarray(bias.const_value.numpy(), np.float64) - shift
    replacement = add_initializer(graph, f"{bias.name}_corrected", value.astype(bias.dtype.numpy()))
    node.replace_input_with(2, replacement)
    drop_if_unused(graph, bias)


def _dequantized_weight(node: ir.Node) -> np.ndarray:
    """The kernel the Conv computes with: what its weight DequantizeLinear returns."""
    dq = node.inputs[1].producer() if node.inputs[1] is not None else None
    assert dq is not None and dq.op_type == "DequantizeLinear"
    codes, scales, *zero = (value.const_value.numpy() for value in dq.inputs if value is not None)  # type: ignore[union-attr]
    axis = dq.attributes.get_int("axis", 1) if np.ndim(scales) else None
    return dequantize(codes, scales, zero[0] if zero else 0, axis)
