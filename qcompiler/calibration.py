"""Calibration engine: passes declare the statistics they need; one run of the data serves them all.

A pass returns `StatRequest`s (a tensor and a kind of statistic). `stream` merges the requests,
adds the requested intermediate tensors as outputs of a clone of the model, runs the data once
through the runners the driver hands it (the runtime is the driver's choice), folds each batch
into a streaming reducer as it arrives, and yields the statistics each piece of the model
finishes; `collect` gathers them all. Memory is bounded
by the reducers' state (a min/max pair, a histogram, one vector per channel), never by the number
of samples. Statistics of initializers are computed directly, without running anything.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from tqdm.auto import tqdm

from qcompiler.backend import Runner
from qcompiler.data import input_specs, validated
from qcompiler.errors import DataError
from qcompiler.gram_outputs import GRAM_COUNTS, GramSlot, add_gram_outputs
from qcompiler.io import initializer_bytes
from qcompiler.irutil import release_mapped
from qcompiler.pieces import Piece, split
from qcompiler.precision import as_float32
from qcompiler.reducers import (
    AbsMaxPerChannelReducer,
    Gram,
    GramReducer,
    Histogram,
    HistogramReducer,
    MeanMinMaxReducer,
    MeanPerChannelReducer,
    MinMaxPerChannelReducer,
    MinMaxReducer,
    Reducer,
    RowSampleReducer,
)

StatKey = tuple[str, "StatKind", int, int, "tuple[float, float] | None"]


class StatKind(enum.Enum):
    """Kinds of statistics a pass can request."""

    MINMAX = "minmax"
    """Per-tensor (min, max)."""
    MEAN_MINMAX = "mean_minmax"
    """Per-tensor (mean of per-sample minima, mean of per-sample maxima)."""
    HISTOGRAM = "histogram"
    """Per-tensor `Histogram` (percentile and MSE ranges)."""
    ABSMAX_PER_CHANNEL = "absmax_per_channel"
    """max |x| per channel along `axis`."""
    MEAN_PER_CHANNEL = "mean_per_channel"
    """Mean per channel along `axis` (bias correction: a layer's output shift)."""
    MINMAX_PER_CHANNEL = "minmax_per_channel"
    """(min, max) vectors per channel along `axis` (SmoothQuant: exact ranges after scaling)."""
    ROW_SAMPLE = "row_sample"
    """A uniform sample of up to `size` rows (vectors along `axis`), for layer-output error search."""
    GRAM = "gram"
    """XᵀX / rows over rows along the last axis (`Gram`): AWQ, scale estimation, GPTQ."""


@dataclasses.dataclass(frozen=True)
class StatRequest:
    """One statistic of one tensor.

    `axis` is the channel axis of per-channel statistics and samples; `size` the number of rows
    of a ROW_SAMPLE; `bounds` clip a MEAN_PER_CHANNEL's values first (the float reference of a
    quantizer whose saturation replaced a Relu / Clip).
    """

    value: ir.Value
    kind: StatKind
    axis: int = -1
    size: int = 0
    bounds: tuple[float, float] | None = None

    @classmethod
    def channel_minmax(cls, value: ir.Value) -> StatRequest:
        """(min, max) per channel along the last axis."""
        return cls(value, StatKind.MINMAX_PER_CHANNEL, axis=-1)

    @classmethod
    def row_sample(cls, value: ir.Value, size: int) -> StatRequest:
        """Up to `size` sampled rows (vectors along the last axis)."""
        return cls(value, StatKind.ROW_SAMPLE, axis=-1, size=size)

    @classmethod
    def gram(cls, value: ir.Value, block_size: int = 0) -> StatRequest:
        """The mean outer product of the rows (vectors along the last axis).

        With `block_size`, only its diagonal blocks of that many channels.
        """
        return cls(value, StatKind.GRAM, axis=-1, size=block_size)

    @property
    def key(self) -> StatKey:
        """Identity used to merge equal requests from different passes."""
        return (str(self.value.name), self.kind, self.axis, self.size, self.bounds)


def make_reducer(request: StatRequest, histogram_bins: int) -> Reducer:
    """The reducer that computes `request`."""
    if request.kind is StatKind.MINMAX:
        return MinMaxReducer()
    if request.kind is StatKind.MEAN_MINMAX:
        return MeanMinMaxReducer()
    if request.kind is StatKind.HISTOGRAM:
        return HistogramReducer(histogram_bins)
    if request.kind is StatKind.ABSMAX_PER_CHANNEL:
        return AbsMaxPerChannelReducer(request.axis)
    if request.kind is StatKind.MINMAX_PER_CHANNEL:
        return MinMaxPerChannelReducer(request.axis)
    if request.kind is StatKind.MEAN_PER_CHANNEL:
        return MeanPerChannelReducer(request.axis, request.bounds)
    if request.kind is StatKind.GRAM:
        return GramReducer(request.size)
    return RowSampleReducer(request.axis, request.size)


class Statistics:
    """Results of a calibration step, looked up by the request that asked for them."""

    def __init__(self, results: Mapping[StatKey, object], batches: int) -> None:
        self._results = dict(results)
        self.batches = batches

    def __getitem__(self, request: StatRequest) -> object:
        return self._results[request.key]

    @property
    def results(self) -> Mapping[StatKey, object]:
        """Every statistic, by key."""
        return self._results

    def minmax(self, value: ir.Value) -> tuple[float, float]:
        """Min and max of `value`."""
        return self._results[StatRequest(value, StatKind.MINMAX).key]  # type: ignore[return-value]

    def histogram(self, value: ir.Value) -> Histogram:
        """Histogram of `value`."""
        return self._results[StatRequest(value, StatKind.HISTOGRAM).key]  # type: ignore[return-value]

    def with_results(self, extra: Mapping[StatKey, object]) -> Statistics:
        """These results plus `extra` (e.g. statistics derived by an earlier step)."""
        return Statistics({**extra, **self._results}, self.batches)

    def get(self, request: StatRequest) -> object | None:
        """The result of `request`, or None if it was not collected."""
        return self._results.get(request.key)

    def __len__(self) -> int:
        return len(self._results)


def require_finite(array: np.ndarray, name: str, batch: int) -> None:
    """A NaN or Inf reaching a statistic would become a NaN scale: name the tensor and the batch instead.

    The data was checked finite as it was read, so the model itself overflows here (a weight out
    of float range, an exp of a large value) on this data.
    """
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DataError(
            f"calibration: tensor {name!r} holds NaN or Inf on batch {batch + 1} (the data is finite): "
            "the model overflows on this data, so it has no range to quantize"
        )


def finished(key: StatKey, reducer: Reducer) -> object:
    """A reducer's result; one that overflowed float32 (finite rows, an infinite XᵀX) is named."""
    result = reducer.result()
    values = result.blocks if isinstance(result, Gram) else result
    if isinstance(values, np.ndarray) and values.dtype.kind == "f" and not np.isfinite(values).all():
        raise DataError(
            f"calibration: the statistics of tensor {key[0]!r} overflow float32 (its values are too large "
            "to square and sum): the model or the data holds out-of-range values"
        )
    return result


def _with_outputs(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A clone of `model` whose outputs are exactly the named tensors.

    The model's own outputs are dropped unless requested, so the runtime prunes what only they
    needed (an LM head and its logits are most of a small decoder's cost).
    """
    clone = model.clone()
    values: dict[str, ir.Value] = {}
    for node in clone.graph:
        for output in node.outputs:
            values[str(output.name)] = output
    clone.graph.outputs.clear()
    clone.graph.outputs.extend(values[name] for name in names)
    return clone


def _gram_in_graph(request: StatRequest, rows_per_batch: int) -> bool:
    """Whether a Gram request is better computed by the model itself.

    It can be when the channel count is static and blocks divide it; the runtime then returns
    [blocks, B, B] per batch instead of the activation. That pays off for long batches only: a
    full C x C product, or blocks on a short batch (MiniLM: ~60 rows, blocks of 128: 6.2 s vs
    4.5 s to compile), cost more than copying the activation out, which the reducer buffers into
    one product per C rows.
    """
    shape = request.value.shape
    if request.kind is not StatKind.GRAM or shape is None or not shape.dims:
        return False
    channels = shape.dims[-1]
    blocked = isinstance(channels, int) and 0 < request.size < channels and channels % request.size == 0
    return blocked and rows_per_batch >= 4 * request.size


def _rows_per_batch(feed: Mapping[str, np.ndarray]) -> int:
    """Rows an activation of this batch has.

    The token count for integer (token id) inputs, else the leading dimensions of the largest
    float input.
    """
    tokens = [array.size for array in feed.values() if array.dtype.kind in "iu" and array.ndim >= 2]
    if tokens:
        return int(max(tokens))
    floats = [
        int(np.prod(array.shape[:-1]))
        for array in feed.values()
        if array.dtype.kind == "f" and array.ndim >= 2
    ]
    return max(floats, default=0)


def _piece_inputs(
    source: Iterable[Mapping[str, np.ndarray]], names: list[str], in_flight: collections.deque
) -> Iterator[dict[str, np.ndarray]]:
    """The named arrays of each feed, remembering each feed in `in_flight` until its outputs come back."""
    for feed in source:
        in_flight.append(feed)
        yield {name: feed[name] for name in names}


SPLIT_FACTOR = 4
"""Models with fewer weight bytes than this many pieces run whole (a piece costs a compile)."""


RunnerMaker = Callable[[ir.Model, int], Runner]
"""(a piece of the model, rows per batch) -> the runner calibration runs it with (the driver's choice)."""


@dataclasses.dataclass(frozen=True)
class CalibrationSettings:
    """How one calibration run reads the data.

    Attributes:
        histogram_bins: bins per histogram.
        max_batches: stop after this many batches.
        piece_bytes: a model whose weights (those the statistics need) exceed `SPLIT_FACTOR` times
            this runs piece by piece, each holding about this many bytes of weights
            (`qcompiler.pieces`); None runs it whole.
        progress: show a tqdm bar.
        description: label of the progress bar.
        together: sets of node names no piece cut may separate (`pieces.split`).
    """

    histogram_bins: int = 2048
    max_batches: int | None = None
    piece_bytes: int | None = None
    progress: bool = True
    description: str = "calibrating"
    together: tuple[frozenset[str], ...] = ()


def collect(
    model: ir.Model,
    requests: Iterable[StatRequest],
    data: Iterable[Mapping[str, np.ndarray]],
    runners: RunnerMaker,
    **settings: Any,
) -> Statistics:
    """Every statistic of `stream`, gathered (`settings`: the fields of `CalibrationSettings`)."""
    results: dict[StatKey, object] = {}
    batches = 0
    for finished in stream(model, requests, data, runners, CalibrationSettings(**settings)):
        results.update(finished.results)
        batches = max(batches, finished.batches)
    return Statistics(results, batches)


def stream(
    model: ir.Model,
    requests: Iterable[StatRequest],
    data: Iterable[Mapping[str, np.ndarray]],
    runners: RunnerMaker,
    settings: CalibrationSettings | None = None,
) -> Iterator[Statistics]:
    """Run `data` once through `model`; yield the statistics as each piece of the model finishes them.

    Statistics of constants come first (no run); then each piece that finishes statistics yields
    those of the tensors it computes (later pieces do not read them): a consumer can use and drop
    them before the next piece runs. Nothing empty is yielded, except once at the end of a run so
    that its ``batches`` (the number of batches read) is always reported.

    Args:
        model: the float model (not modified).
        requests: statistics wanted, possibly with duplicates across passes.
        data: batches (feed dicts); each is validated against the model's inputs.
        runners: makes the runner of each piece.
        settings: how the data is read.
    """
    settings = settings or CalibrationSettings()
    merged: dict[StatKey, StatRequest] = {}
    for request in requests:
        merged.setdefault(request.key, request)
    constants: dict[StatKey, object] = {}
    runtime_keys = []
    for key, request in merged.items():
        if request.value.const_value is not None:  # constant tensors need no run
            reducer = make_reducer(request, settings.histogram_bins)
            reducer.update(as_float32(np.asarray(request.value.const_value.numpy())))
            constants[key] = reducer.result()
        else:
            runtime_keys.append(key)
    if constants:
        yield Statistics(constants, 0)
    if runtime_keys:
        yield from _PieceRun(model, merged, runtime_keys, runners, settings).run(data)


class _PieceRun:
    """One run of the data through the model, whole or piece by piece, for `stream`.

    Piece by piece, each piece runs over every batch before the next is compiled, and the
    tensors later pieces read are kept per batch in between.
    """

    def __init__(
        self,
        model: ir.Model,
        merged: Mapping[StatKey, StatRequest],
        runtime_keys: list[StatKey],
        runners: RunnerMaker,
        settings: CalibrationSettings,
    ) -> None:
        self.model = model
        self.merged = merged
        self.runtime_keys = runtime_keys
        self.runners = runners
        self.settings = settings
        self.specs = input_specs(model)
        self.input_names = {spec.name for spec in self.specs}
        self.reducers = {key: make_reducer(merged[key], settings.histogram_bins) for key in runtime_keys}

    def run(self, data: Iterable[Mapping[str, np.ndarray]]) -> Iterator[Statistics]:
        """Yield each piece's finished statistics (see `stream`)."""
        settings, merged = self.settings, self.merged
        grams = [key for key in self.runtime_keys if merged[key].kind is StatKind.GRAM]
        rows = _rows_per_batch(next(iter(data), {}))  # the first batch stands for all
        in_graph = {key for key in grams if _gram_in_graph(merged[key], rows)}
        fetch = sorted({key[0] for key in self.runtime_keys if key not in in_graph} - self.input_names)
        gram_sources = sorted({key[0] for key in in_graph} - self.input_names)
        parts = self._pieces(fetch, gram_sources)
        total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
        if settings.max_batches is not None and total is not None:
            total = min(total, settings.max_batches)
        bar = tqdm(
            total=total * len(parts) if total is not None else None,
            desc=settings.description,
            unit="batch",
            disable=not settings.progress,
        )
        source: Iterable[Mapping[str, np.ndarray]] = validated(
            data, self.specs, "calibration data", limit=settings.max_batches
        )
        pending = {key: merged[key] for key in in_graph}
        batches = 0
        for number, part in enumerate(parts):
            available = {str(value.name) for value in part.model.graph.inputs}
            available.update(str(output.name) for node in part.model.graph for output in node.outputs)
            here = {key: request for key, request in pending.items() if key[0] in available}
            for key in here:
                del pending[key]
            slots = add_gram_outputs(part.model, here)
            outputs_here = {str(value.name) for value in part.model.graph.outputs}
            fetched = [name for name in fetch if name in outputs_here]
            reduce_keys = [
                key
                for key in self.runtime_keys
                if key in slots or (key not in in_graph and key[0] in fetched)
            ]
            if number == 0:  # statistics of the model's inputs come from the feeds
                reduce_keys += [
                    key for key in self.runtime_keys if key[0] in self.input_names and key not in in_graph
                ]
            later = set().union(*(set(other.inputs) for other in parts[number + 1 :]))
            source, read = self._run_piece(part, source, fetched, slots, reduce_keys, later, rows, bar)
            batches = batches or read
            if reduce_keys or number == len(parts) - 1:
                yield Statistics({key: finished(key, self.reducers.pop(key)) for key in reduce_keys}, batches)
        bar.close()
        if self.reducers:  # nothing should be left; never lose a statistic if a piece missed one
            yield Statistics({key: reducer.result() for key, reducer in self.reducers.items()}, batches)

    def _pieces(self, fetch: list[str], gram_sources: list[str]) -> list[Piece]:
        """The model with the needed tensors as outputs, whole or cut into pieces."""
        clone = _with_outputs(self.model, fetch + gram_sources)
        common.RemoveUnusedNodesPass()(clone)
        piece_bytes = self.settings.piece_bytes
        if piece_bytes is not None and initializer_bytes(clone) > SPLIT_FACTOR * piece_bytes:
            return split(clone, piece_bytes, keep=fetch, together=self.settings.together)
        clone.graph.outputs[:] = [value for value in clone.graph.outputs if str(value.name) in fetch]
        return [Piece(clone, sorted(self.input_names), [])]

    def _run_piece(
        self,
        part: Piece,
        source: Iterable[Mapping[str, np.ndarray]],
        fetched: list[str],
        slots: Mapping[StatKey, GramSlot],
        reduce_keys: list[StatKey],
        later: set[str],
        rows: int,
        bar: tqdm,
    ) -> tuple[list[dict[str, np.ndarray]], int]:
        """Run every batch through one piece into the reducers; the tensors later pieces read, per batch."""
        names = (
            fetched + sorted({slot.products for slot in slots.values()}) + ([GRAM_COUNTS] if slots else [])
        )
        names += [name for name in part.carried if name not in names]
        runner = self.runners(part.model, rows) if names else None  # None: statistics of inputs only
        for value in part.model.graph.initializers.values():  # the runtime holds its own copy
            release_mapped(value.const_value)
        kept: list[dict[str, np.ndarray]] = []
        in_flight: collections.deque[Mapping[str, np.ndarray]] = collections.deque()
        inputs = _piece_inputs(source, part.inputs, in_flight)
        results = runner.run_all(names, inputs) if runner is not None else (None for _ in inputs)
        read = 0
        for result in results:
            feed = in_flight.popleft()
            outputs = {} if result is None else dict(zip(names, result, strict=True))
            outputs.update({name: feed[name] for name in self.input_names if name in feed})
            for key in reduce_keys:
                if key in slots:
                    slot = slots[key]
                    product = outputs[slot.products][slot.start : slot.stop]
                    require_finite(product, key[0], read)
                    self.reducers[key].add_product(  # type: ignore[attr-defined]
                        product, int(outputs[GRAM_COUNTS][slot.count])
                    )
                else:
                    array = as_float32(outputs[key[0]])
                    require_finite(array, key[0], read)
                    self.reducers[key].update(array)
            if later:
                carry = {name: array for name, array in feed.items() if name in later}
                carry.update({name: outputs[name] for name in part.carried if name in later})
                kept.append(carry)
            read += 1
            bar.update()
        del runner
        return kept, read
