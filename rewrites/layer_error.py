"""The error proxy that SmoothQuant's alpha search and the activation range search minimise.

For an activation X (sampled rows x_r) read by linear layers with weights W_j [C, N_j], with
e_r = sum_j ||x_r W_j - DQ(Q(x_r)) DQ(Q(W_j))||^2 and n_r = sum_j ||x_r W_j||^2, the proxy is

    sum_r e_r / sum_r n_r  +  max_r (e_r / n_r),

X quantized per tensor over [lo, hi] and each W_j symmetric per output channel. It measures what
the model sees (layer outputs), not the tensor's own rounding error. The first term is the average
error; the second is the error of the worst row (token), which the average hides: on MiniLM the
average alone picks SmoothQuant alphas of 0.95 that cost the worst sentences (min embedding cosine
0.988 against 0.991 with the worst-row term, calibrated on one or eight sentences per batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qcompiler.numerics import (
    activation_params,
    dequantize,
    quantize,
    symmetric_weight_scales,
    weight_type_beside,
)
from qcompiler.options import QuantType

PROXY_COLUMNS = 2048


def subsample_columns(weights: Sequence[np.ndarray], limit: int = PROXY_COLUMNS) -> list[np.ndarray]:
    """Every k-th output column of wide weights (an lm_head has ~50k), keeping the proxy cheap.

    Per-output-channel weight quantization treats columns independently, so the proxy on a column
    subset is an unbiased estimate of the proxy on all of them.
    """
    return [w if w.shape[1] <= limit else w[:, :: -(-w.shape[1] // limit)] for w in weights]


def fake_quantize_weight(weight: np.ndarray, activation_type: QuantType = QuantType.INT8) -> np.ndarray:
    """W [C, N] after symmetric per-output-channel (axis 1) quantization and dequantization.

    In the weight type paired with `activation_type` (`numerics.weight_type_beside`).
    """
    qtype = weight_type_beside(activation_type)
    scales = symmetric_weight_scales(weight, axis=1, qtype=qtype)
    return dequantize(quantize(weight, scales, 0, qtype, axis=1), scales, 0, axis=1)


def fake_quantize_activation(
    rows: np.ndarray, lo: float, hi: float, qtype: QuantType, symmetric: bool
) -> np.ndarray:
    """X after per-tensor quantization over [lo, hi] and dequantization."""
    scale, zero_point = activation_params(lo, hi, qtype, symmetric=symmetric)
    return dequantize(quantize(rows, scale, zero_point, qtype), scale, zero_point)


def layer_output_error(
    rows: np.ndarray,
    weights: Sequence[np.ndarray],
    lo: float,
    hi: float,
    qtype: QuantType,
    *,
    symmetric: bool,
    quantized_weights: Sequence[np.ndarray] | None = None,
) -> float:
    """Relative squared error of the quantized layers' outputs on `rows` (see module docstring)."""
    x = rows.astype(np.float32)
    xq = fake_quantize_activation(x, lo, hi, qtype, symmetric)
    if quantized_weights is None:
        quantized_weights = [fake_quantize_weight(w, qtype) for w in weights]
    error = np.zeros(len(x))
    reference = np.zeros(len(x))
    for weight, weight_q in zip(weights, quantized_weights, strict=True):
        exact = x @ weight
        error += np.sum((exact - xq @ weight_q) ** 2, axis=1)
        reference += np.sum(exact**2, axis=1)
    worst_row = float(np.max(error / np.maximum(reference, 1e-30)))
    return float(error.sum() / max(reference.sum(), 1e-30)) + worst_row
