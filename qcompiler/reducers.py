"""Streaming reducers: fold batches of one tensor into a statistic of bounded size.

Each reducer's state is independent of the number of samples (a pair of floats, a fixed-size
histogram, one vector per channel, a fixed number of sampled rows), which is what bounds the
calibration engine's memory.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from qcompiler.errors import DataError
from qcompiler.weight_formats import to_blocks


@dataclasses.dataclass(frozen=True)
class Histogram:
    """Counts over equal-width bins spanning [lo, hi]; `lo`/`hi` are the exact observed extremes."""

    counts: np.ndarray
    lo: float
    hi: float

    @property
    def edges(self) -> np.ndarray:
        """Bin edges, len(counts) + 1 of them."""
        return np.linspace(self.lo, self.hi, len(self.counts) + 1)

    @property
    def centers(self) -> np.ndarray:
        """Bin centres, where each bin's mass is assumed to sit."""
        edges = self.edges
        return (edges[:-1] + edges[1:]) / 2


class Reducer(Protocol):
    """Folds batches of one tensor into a bounded-size statistic."""

    def update(self, array: np.ndarray) -> None:
        """Fold in one batch."""

    def result(self) -> object:
        """The statistic over everything seen so far."""


class MinMaxReducer:
    """Running minimum and maximum."""

    def __init__(self) -> None:
        self.lo = np.inf
        self.hi = -np.inf

    def update(self, array: np.ndarray) -> None:
        """Fold in one batch (NaNs are ignored)."""
        if array.size:
            self.lo = min(self.lo, float(np.nanmin(array)))
            self.hi = max(self.hi, float(np.nanmax(array)))

    def result(self) -> tuple[float, float]:
        """(min, max); (0, 0) when nothing was seen."""
        if self.lo > self.hi:
            return (0.0, 0.0)
        return (self.lo, self.hi)


class MeanMinMaxReducer:
    """The mean over samples (rows of axis 0) of each sample's minimum and maximum.

    Robust to the rare outlier sample that sets a global MinMax range (NNCF's default
    ``MEAN_MINMAX`` estimator for per-tensor activations); independent of how samples are batched.
    """

    def __init__(self) -> None:
        self.lo_sum = 0.0
        self.hi_sum = 0.0
        self.samples = 0

    def update(self, array: np.ndarray) -> None:
        """Fold in one batch (NaNs are ignored)."""
        if not array.size:
            return
        rows = array.reshape(array.shape[0] if array.ndim > 1 else 1, -1)
        self.lo_sum += float(np.nanmin(rows, axis=1).sum())
        self.hi_sum += float(np.nanmax(rows, axis=1).sum())
        self.samples += rows.shape[0]

    def result(self) -> tuple[float, float]:
        """(mean min, mean max); (0, 0) when nothing was seen."""
        if not self.samples:
            return (0.0, 0.0)
        return (self.lo_sum / self.samples, self.hi_sum / self.samples)


class HistogramReducer:
    """A fixed number of equal-width bins whose range grows to cover every batch.

    When a batch falls outside the current range, the existing counts are redistributed over the
    wider range by linear interpolation of the cumulative distribution (as PyTorch's
    HistogramObserver does), then the batch is added exactly.
    """

    def __init__(self, bins: int = 2048) -> None:
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.float64)
        self.lo = np.inf
        self.hi = -np.inf

    def update(self, array: np.ndarray) -> None:
        """Fold in one batch."""
        flat = np.asarray(array, dtype=np.float64).ravel()
        flat = flat[np.isfinite(flat)]
        if flat.size == 0:
            return
        lo, hi = float(flat.min()), float(flat.max())
        if self.lo > self.hi:
            self.lo, self.hi = lo, hi
        elif lo < self.lo or hi > self.hi:
            self._widen(min(lo, self.lo), max(hi, self.hi))
        span_hi = self.hi if self.hi > self.lo else self.lo + 1e-12
        counts, _ = np.histogram(flat, bins=self.bins, range=(self.lo, span_hi))
        self.counts += counts

    def _widen(self, lo: float, hi: float) -> None:
        old_edges = np.linspace(self.lo, self.hi, self.bins + 1)
        cumulative = np.concatenate([[0.0], np.cumsum(self.counts)])
        new_edges = np.linspace(lo, hi, self.bins + 1)
        redistributed = np.interp(new_edges, old_edges, cumulative, left=0.0, right=cumulative[-1])
        self.counts = np.diff(redistributed)
        self.lo, self.hi = lo, hi

    def result(self) -> Histogram:
        """The histogram so far."""
        if self.lo > self.hi:
            return Histogram(np.zeros(self.bins), 0.0, 0.0)
        return Histogram(self.counts.copy(), self.lo, self.hi)


class AbsMaxPerChannelReducer:
    """Running max of |x| per channel along `axis` (reduced over every other axis)."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.absmax: np.ndarray | None = None

    def update(self, array: np.ndarray) -> None:
        """Fold in one batch."""
        moved = np.moveaxis(np.abs(array), self.axis, -1)
        batch_max = moved.reshape(-1, moved.shape[-1]).max(axis=0)
        self.absmax = batch_max if self.absmax is None else np.maximum(self.absmax, batch_max)

    def result(self) -> np.ndarray:
        """One value per channel."""
        if self.absmax is None:
            raise DataError("per-channel statistic requested but no data was seen")
        return self.absmax


class MinMaxPerChannelReducer:
    """Running (min, max) per channel along `axis`."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.lo: np.ndarray | None = None
        self.hi: np.ndarray | None = None

    def update(self, array: np.ndarray) -> None:
        """Fold in one batch."""
        moved = np.moveaxis(np.asarray(array), self.axis, -1)
        rows = moved.reshape(-1, moved.shape[-1])
        lo, hi = rows.min(axis=0), rows.max(axis=0)
        self.lo = lo if self.lo is None else np.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else np.maximum(self.hi, hi)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(min per channel, max per channel)."""
        if self.lo is None or self.hi is None:
            raise DataError("per-channel statistic requested but no data was seen")
        return self.lo, self.hi


class MeanPerChannelReducer:
    """Mean per channel along `axis` over every other axis and every batch (float64 sums).

    With `bounds`, of the values clipped to them.
    """

    def __init__(self, axis: int, bounds: tuple[float, float] | None = None) -> None:
        self.axis = axis
        self.bounds = bounds
        self.total: np.ndarray | None = None
        self.count = 0

    def update(self, array: np.ndarray) -> None:
        """Fold in one batch."""
        array = np.asarray(array) if self.bounds is None else np.clip(array, *self.bounds)
        moved = np.moveaxis(array, self.axis, -1)
        rows = moved.reshape(-1, moved.shape[-1])
        sums = rows.sum(axis=0, dtype=np.float64)
        self.total = sums if self.total is None else self.total + sums
        self.count += rows.shape[0]

    def result(self) -> np.ndarray:
        """The mean per channel."""
        if self.total is None:
            raise DataError("per-channel statistic requested but no data was seen")
        return self.total / max(self.count, 1)


class RowSampleReducer:
    """A uniform random sample of at most `size` rows (vectors along `axis`) over all batches.

    Every row gets a random key and the `size` rows with the smallest keys are kept, which is a
    uniform sample without replacement whatever the batch sizes (reservoir sampling).
    """

    def __init__(self, axis: int, size: int, seed: int = 0) -> None:
        self.axis = axis
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.rows: np.ndarray | None = None
        self.keys = np.empty(0)

    def update(self, array: np.ndarray) -> None:
        """Fold in one batch."""
        moved = np.moveaxis(np.asarray(array), self.axis, -1)
        rows = moved.reshape(-1, moved.shape[-1])
        keys = self.rng.random(len(rows))
        if self.rows is not None:
            rows = np.concatenate([self.rows, rows])
            keys = np.concatenate([self.keys, keys])
        if len(rows) > self.size:
            keep = np.argpartition(keys, self.size)[: self.size]
            rows, keys = rows[keep], keys[keep]
        self.rows, self.keys = np.array(rows, copy=True), keys

    def result(self) -> np.ndarray:
        """The sampled rows, shape [n <= size, channels]."""
        if self.rows is None:
            raise DataError("row sample requested but no data was seen")
        return self.rows


@dataclasses.dataclass(frozen=True)
class Gram:
    """Mean outer product of the rows of X, H = XᵀX / rows, or its diagonal blocks.

    H is the Hessian of a linear layer's mean squared output error (up to a factor of 2), which
    is what AWQ, scale estimation and GPTQ weigh weight errors by. `blocks` [n, B, B] holds the
    diagonal blocks of B channels (the last zero-padded); a full Gram is one block of all
    channels. Blocks cost rows x C x B to collect instead of rows x C².
    """

    blocks: np.ndarray
    channels: int
    rows: int

    @classmethod
    def full(cls, matrix: np.ndarray, rows: int) -> Gram:
        """A full C x C Gram matrix."""
        return cls(np.asarray(matrix, np.float32)[None], matrix.shape[0], rows)

    @property
    def is_full(self) -> bool:
        """Whether cross-block terms are known (GPTQ needs them)."""
        return self.blocks.shape[0] == 1 and self.blocks.shape[1] == self.channels

    @property
    def block_size(self) -> int:
        """Channels per diagonal block."""
        return int(self.blocks.shape[1])

    @property
    def matrix(self) -> np.ndarray:
        """The full matrix (only for a full Gram)."""
        if not self.is_full:
            raise ValueError("this Gram holds diagonal blocks only; request a full one (block size 0)")
        return self.blocks[0]

    @property
    def channel_rms(self) -> np.ndarray:
        """sqrt(mean x_c²) per channel: AWQ's activation importance."""
        diagonal = np.diagonal(self.blocks, axis1=1, axis2=2).reshape(-1)[: self.channels]
        return np.sqrt(np.maximum(diagonal, 0.0))

    def diagonal_blocks(self, size: int) -> np.ndarray:
        """[ceil(C / size), size, size] diagonal blocks (zero-padded); from a full Gram any size."""
        if not self.is_full:
            if size != self.block_size:
                raise ValueError(f"Gram collected in blocks of {self.block_size}, asked for {size}")
            return self.blocks
        matrix, count = self.blocks[0], -(-self.channels // size)
        blocks = np.zeros((count, size, size), np.float32)
        for index in range(count):
            start, stop = index * size, min((index + 1) * size, self.channels)
            blocks[index, : stop - start, : stop - start] = matrix[start:stop, start:stop]
        return blocks

    def weighted_error(self, error: np.ndarray) -> float:
        """tr(Eᵀ H E): the mean squared layer-output error a weight error E [C, N] causes.

        Cross-block terms are omitted for a blocked Gram.
        """
        blocked = to_blocks(np.asarray(error, np.float32), self.block_size)
        return float(np.einsum("kbn,kbn->", np.matmul(self.blocks, blocked), blocked))

    def scaled(self, scales: np.ndarray) -> Gram:
        """The Gram of X / s (after AWQ folds s): H / s sᵀ."""
        padded = np.ones(self.blocks.shape[0] * self.block_size, np.float32)
        padded[: self.channels] = scales
        per_block = padded.reshape(self.blocks.shape[0], self.block_size)
        blocks = self.blocks / (per_block[:, :, None] * per_block[:, None, :])
        return Gram(blocks.astype(np.float32), self.channels, self.rows)


class GramReducer:
    """Running XᵀX over rows (vectors along the last axis): full, or its diagonal blocks.

    Rows are buffered until there are `min_flush_rows`, so the accumulator is touched once per
    few hundred rows rather than once per (possibly tiny) batch. The buffer stays a fraction of
    the accumulator: buffering up to C rows, as before, doubled the memory of a decoder's full
    Gram matrices (GPTQ on SmolLM2: 400 MB). Products are float32 (BLAS), summed in float32.
    """

    def __init__(self, block_size: int = 0, min_flush_rows: int = 512) -> None:
        self.block_size = block_size
        self.total: np.ndarray | None = None
        self.channels = 0
        self.rows = 0
        self.min_flush_rows = min_flush_rows
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self._result: Gram | None = None

    def update(self, array: np.ndarray) -> None:
        """Fold in one batch; rows with a NaN or infinity are refused with the tensor's shape."""
        rows = np.asarray(array, np.float32).reshape(-1, array.shape[-1])
        if not np.isfinite(rows).all():
            raise DataError(f"non-finite values in a calibration tensor of shape {array.shape}")
        self._pending.append(rows)
        self._pending_rows += rows.shape[0]
        if self._pending_rows >= self.min_flush_rows:
            self._flush()

    def add_product(self, product: np.ndarray, rows: int) -> None:
        """Fold in a batch's XᵀX blocks [n_blocks, B, B] computed elsewhere (in the graph)."""
        product = np.asarray(product, np.float32)
        if not np.isfinite(product).all():
            raise DataError("non-finite values reached a calibration tensor's Gram matrix")
        self.channels = product.shape[0] * product.shape[1]
        if self.total is None:
            self.total = product.copy()
        else:
            self.total += product
        self.rows += rows

    def _flush(self) -> None:
        if not self._pending:
            return
        rows = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        self.channels = rows.shape[1]
        size = self.block_size if 0 < self.block_size < self.channels else self.channels
        # an overflow to inf is reported by name when the statistic is finished (`calibration.finished`)
        with np.errstate(over="ignore", invalid="ignore"):
            if size == self.channels:
                product = (rows.T @ rows)[None]  # numpy runs XᵀX as a symmetric rank-k update (syrk)
            else:
                padded = to_blocks(rows.T, size).transpose(0, 2, 1) if self.channels % size else None
                view = padded if padded is not None else rows.reshape(len(rows), -1, size).transpose(1, 0, 2)
                product = np.matmul(view.transpose(0, 2, 1), view)  # [n_blocks, B, B], no copy of X
        if self.total is None:
            self.total = product
        else:
            self.total += product
        self.rows += rows.shape[0]
        self._pending, self._pending_rows = [], 0

    def result(self) -> Gram:
        """The mean outer product (float32); the accumulator becomes it (no second copy)."""
        self._flush()
        if self._result is None:
            if self.total is None:
                raise DataError("no calibration rows reached a tensor whose Gram matrix was requested")
            self.total /= self.rows
            self._result = Gram(self.total, self.channels, self.rows)
            self.total = None
        return self._result
