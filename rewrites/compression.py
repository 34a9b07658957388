"""Weight-only compression: plan formats, run the algorithms, write the canonical form.

The canonical form is a constant low-bit initializer -> DequantizeLinear -> MatMul / Gather.

The plan (units, roles, formats, statistics) is `rewrites/weight_plan.py`; `--ratio` moves the
most sensitive MatMuls to INT8 per channel (`assign_mixed_precision`).

`compress_weights` then searches AWQ scales per input group of MatMuls and folds them upstream
(fold-only: a group whose producer cannot absorb 1/s is left alone), and compresses every unit
with RTN, scale estimation and/or GPTQ on the Gram matrices of their inputs (embeddings: RTN),
replacing each float initializer as it goes so only one layer is expanded at a time.

The canonical form is written and read by `qcompiler/canonical.py`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from qcompiler import errors
from qcompiler.calibration import Statistics, StatRequest
from qcompiler.canonical import CompressionRecord, write_canonical
from qcompiler.options import CompressionOptions, IgnoredScope, WeightFormat
from qcompiler.reducers import Gram
from qcompiler.rewrites.awq import awq_scales
from qcompiler.rewrites.gptq import PreparedHessian, gptq, prepare_hessian
from qcompiler.rewrites.hqq import hqq
from qcompiler.rewrites.scale_estimation import estimate_scales
from qcompiler.rewrites.smoothing import SmoothGroup, find_groups, fold_precheck, scale_channels
from qcompiler.rewrites.weight_plan import (
    BACKUP_FORMAT,
    WeightRole,
    WeightUnit,
    input_name,
    plan_compression,
)
from qcompiler.weight_formats import (
    CompressedWeight,
    column_slice,
    join_columns,
    quantize,
    resolve_block_size,
)


def awq_spans(model: ir.Model, ignored: IgnoredScope) -> tuple[frozenset[str], ...]:
    """For each AWQ input group that may fold, the nodes its scales touch.

    Its consumers, its producer, and the MatMuls feeding the producer (a down projection's 1/s
    goes into the up projection). Calibration keeps each span in one piece (`CalibrationSettings.together`): a group whose
    producer is compressed in an earlier piece cannot be scaled.
    """
    spans = []
    for group in find_groups(model, ignored):
        if fold_precheck(group) is not None:
            continue
        names = {str(node.name) for node in group.consumers}
        producer = group.activation.producer()
        if producer is not None:
            names.add(str(producer.name))
            for value in producer.inputs:
                feeder = value.producer() if value is not None else None
                if feeder is not None and feeder.op_type in ("MatMul", "Gemm"):
                    names.add(str(feeder.name))
        spans.append(frozenset(names))
    return tuple(spans)


def _gram_of(unit: WeightUnit, grams: Mapping[str, Gram]) -> Gram | None:
    activation = unit.activation
    return None if activation is None else grams.get(str(activation.name))


def assign_mixed_precision(
    units: list[WeightUnit], grams: Mapping[str, Gram], options: CompressionOptions, *, progress: bool = True
) -> dict[str, float]:
    """Move the most sensitive MatMuls to INT8 until `ratio` of their size is left in the format.

    Sensitivity: the RTN error in the main format weighted by the input's Gram matrix (plain
    squared error without data), per parameter. Returns the sensitivities by node name.
    """
    candidates = [unit for unit in units if unit.role is WeightRole.MATMUL]
    if options.ratio >= 1.0 or not candidates:
        return {}
    sensitivity: dict[str, float] = {}
    for unit in tqdm(candidates, desc="sensitivity", leave=False, disable=not progress):
        weight = unit.matrix()
        block = resolve_block_size(unit.format, unit.group_size, weight.shape[0])
        error = quantize(weight, unit.format, block, symmetric=unit.symmetric).dequantize() - weight
        gram = _gram_of(unit, grams)
        value = gram.weighted_error(error) if gram is not None else float(np.sum(error * error))
        sensitivity[str(unit.node.name)] = value / unit.size
    total = sum(unit.size for unit in candidates)
    budget = (1.0 - options.ratio) * total
    moved = 0
    for unit in sorted(candidates, key=lambda u: -sensitivity[str(u.node.name)]):
        if moved >= budget:
            break
        unit.format, unit.symmetric, unit.group_size = BACKUP_FORMAT, False, 0
        moved += unit.size
    return sensitivity


def apply_awq(
    model: ir.Model, units: list[WeightUnit], grams: dict[str, Gram], ignored: IgnoredScope, progress: bool
) -> dict[str, dict[str, object]]:
    """Search and fold AWQ scales for every input group of main-format MatMuls.

    Updates `grams` (X becomes X / s, so H becomes H / s sᵀ). Returns the per-group report.
    """
    main = {id(unit.node): unit for unit in units if unit.role is not WeightRole.EMBEDDING}
    groups = [
        group
        for group in find_groups(model, ignored)
        if all(id(node) in main for node in group.consumers) and str(group.activation.name) in grams
    ]
    summary: dict[str, dict[str, object]] = {}
    searchable = []
    for group in groups:
        refusal = fold_precheck(group)
        if refusal is None:
            searchable.append(group)
        else:
            summary[str(group.activation.name)] = {"alpha": None, "applied": f"not searched ({refusal})"}

    def search(group: SmoothGroup) -> tuple[float | None, np.ndarray | None]:
        unit = main[id(group.consumers[0])]
        gram = grams[str(group.activation.name)]
        weights = [main[id(node)].matrix() for node in group.consumers]
        block = resolve_block_size(unit.format, unit.group_size, weights[0].shape[0])
        choice = awq_scales(weights, gram, unit.format, block, symmetric=unit.symmetric)
        summary[str(group.activation.name)] = {"alpha": choice.alpha}
        return choice.alpha, choice.scales

    outcomes, decisions = scale_channels(
        model,
        searchable,
        search,
        label="awq ",
        insert_mul=False,
        progress=progress,
        description="AWQ scale search",
    )
    for group, scales in decisions:
        name = str(group.activation.name)
        summary[name]["applied"] = outcomes[name]
        if outcomes[name].startswith("folded"):
            grams[name] = grams[name].scaled(scales)
    return summary


def compress_unit(
    unit: WeightUnit, gram: Gram | None, options: CompressionOptions, prepared: PreparedHessian | None = None
) -> tuple[CompressedWeight, CompressionRecord, float | None]:
    """Compress one weight with the requested algorithms (those needing data skip without it).

    Returns the weight, the record of how it was made, and its Gram-weighted relative output error (None
    without statistics). `prepared`: GPTQ's inverse Hessian of this input, when another layer
    already computed it.
    """
    with errors.context(node=str(unit.node.name)):
        return _compress_unit(unit, gram, options, prepared)


def _compress_unit(
    unit: WeightUnit, gram: Gram | None, options: CompressionOptions, prepared: PreparedHessian | None
) -> tuple[CompressedWeight, CompressionRecord, float | None]:
    weight = unit.matrix()  # read once: a lazy external weight is read from disk per call
    block = resolve_block_size(unit.format, unit.group_size, weight.shape[0])
    # NVFP4's tensor scale is the whole weight's, so it is not sliced
    step = weight.shape[1] if unit.format is WeightFormat.NVFP4 else column_slice(weight.shape)
    parts: list[CompressedWeight] = []
    steps: list[str] = []
    error, energy = 0.0, 0.0
    for start in range(0, weight.shape[1], step):
        part = weight[:, start : start + step]
        compressed, steps = _run_algorithms(part, block, unit, gram, options, prepared)
        if gram is not None:
            error += gram.weighted_error(compressed.dequantize() - part)
            energy += gram.weighted_error(part)
        parts.append(compressed)
    compressed = join_columns(parts) if len(parts) > 1 else parts[0]
    relative = error / max(energy, 1e-30) if gram is not None else None
    return compressed, CompressionRecord.of(compressed, tuple(steps)), relative


def _run_algorithms(
    weight: np.ndarray,
    block: int,
    unit: WeightUnit,
    gram: Gram | None,
    options: CompressionOptions,
    prepared: PreparedHessian | None,
) -> tuple[CompressedWeight, list[str]]:
    """The requested algorithms on W [K, N'] (all of the unit's columns or a slice of them)."""
    steps = []
    main = unit.role is not WeightRole.EMBEDDING and gram is not None
    if main and options.scale_estimation:
        compressed = estimate_scales(weight, gram, unit.format, block, symmetric=unit.symmetric)  # type: ignore[arg-type]
        steps.append("scale_estimation")
    elif options.hqq and unit.format.bits == 4 and not unit.symmetric:  # INT8 backups: RTN is near exact
        compressed = hqq(weight, unit.format, block)
        steps.append("hqq")
    else:
        compressed = quantize(weight, unit.format, block, symmetric=unit.symmetric)
        steps.append("rtn")
    if main and options.gptq:
        compressed = gptq(weight, gram, compressed, damping=options.damping, prepared=prepared)  # type: ignore[arg-type]
        steps.append("gptq")
    return compressed, steps


def gram_statistics(statistics: Statistics, requests: list[StatRequest]) -> dict[str, Gram]:
    """The Gram matrices `stat_requests` asked for, by input name."""
    grams = {str(request.value.name): statistics.get(request) for request in requests}
    return {name: gram for name, gram in grams.items() if isinstance(gram, Gram)}


COMPRESSION_THREADS = min(2, os.cpu_count() or 1)
"""Units compressed at once (see `compress_weights`)."""


class UnitCompressor:
    """Compresses units on their Gram statistics, sharing GPTQ's factorization per input."""

    def __init__(self, grams: dict[str, Gram], options: CompressionOptions) -> None:
        self.grams = grams
        self.options = options
        self._hessians: dict[str, PreparedHessian] = {}
        self._lock = threading.Lock()  # units are compressed from two threads

    def __call__(
        self, unit: WeightUnit, options: CompressionOptions | None = None
    ) -> tuple[CompressedWeight, CompressionRecord, float | None]:
        """`compress_unit` with this unit's Gram matrix (`options` overrides the algorithms)."""
        options = options or self.options
        gram = _gram_of(unit, self.grams)
        prepared = None
        if options.gptq and gram is not None and unit.role is not WeightRole.EMBEDDING:
            key = str(unit.activation.name)  # type: ignore[union-attr]
            with self._lock:
                if key not in self._hessians:  # Q, K and V (gate and up) share one factorization
                    self._hessians[key] = prepare_hessian(gram, damping=options.damping)
                prepared = self._hessians[key]
        return compress_unit(unit, gram, options, prepared)

    def forget(self, unit: WeightUnit) -> None:
        """Drop the statistics of `unit`'s input (call once no unit reading it is left)."""
        if unit.activation is not None:
            key = str(unit.activation.name)
            self.grams.pop(key, None)
            with self._lock:
                self._hessians.pop(key, None)


def layer_entry(unit: WeightUnit, record: CompressionRecord, error: float | None) -> dict[str, object]:
    """The report's entry for one compressed unit."""
    entry: dict[str, object] = {"role": unit.role.value, "how": record.line}
    if error is not None:
        entry["relative_error"] = round(error, 8)
    return entry


def compress_weights(
    model: ir.Model,
    units: list[WeightUnit],
    grams: dict[str, Gram],
    options: CompressionOptions,
    ignored: IgnoredScope,
    *,
    progress: bool = True,
) -> dict[str, object]:
    """Run the algorithms and write the canonical form in place; returns the report section.

    `grams`: `gram_statistics` of the requests made before any unit changed format (empty for
    data-free compression). It is consumed: AWQ rescales the ones it folds, and each is dropped
    (with GPTQ's factorization of it) once the last unit reading its input is compressed, so a
    decoder's full Gram matrices do not all outlive their layers.
    """
    sensitivity = assign_mixed_precision(units, grams, options, progress=progress)
    awq_report = apply_awq(model, units, grams, ignored, progress) if options.awq and grams else {}
    layers: dict[str, dict[str, object]] = {}
    compressor = UnitCompressor(grams, options)
    readers = collections.Counter(input_name(unit) for unit in units)
    # Units are independent: numpy releases the GIL in the algorithms' array work, so a thread per
    # core overlaps what one thread leaves serial (rounding, clipping, selection), with BLAS at one
    # thread each (SmolLM2 AWQ + SE: 9.0 -> 7.8 s; with BLAS threads as well: 11.6 s). Results
    # come back in order and each unit's float weight is replaced as soon as its result is in.
    with (
        threadpool_limits(limits=1, user_api="blas"),
        concurrent.futures.ThreadPoolExecutor(max_workers=COMPRESSION_THREADS) as pool,
    ):
        results = pool.map(compressor, units)
        for unit, (compressed, record, error) in tqdm(
            zip(units, results, strict=True),
            total=len(units),
            desc="compressing weights",
            unit="weight",
            disable=not progress,
        ):
            _write(model, unit, compressed, record, error, sensitivity, layers)
            readers[input_name(unit)] -= 1
            if readers[input_name(unit)] == 0:
                compressor.forget(unit)
    return {"layers": layers, "awq": awq_report}


def _write(
    model: ir.Model,
    unit: WeightUnit,
    compressed: CompressedWeight,
    record: CompressionRecord,
    error: float | None,
    sensitivity: Mapping[str, object],
    layers: dict[str, dict[str, object]],
) -> None:
    """Write one unit's canonical form and its report entry."""
    entry = layer_entry(unit, record, error)
    if str(unit.node.name) in sensitivity:
        entry["sensitivity"] = sensitivity[str(unit.node.name)]
    layers[str(unit.node.name)] = entry
    write_canonical(model.graph, unit.node, compressed, record)


def compress_embedding_tables(model: ir.Model, ignored: IgnoredScope) -> dict[str, object]:
    """Store the embedding tables INT8 (weight-only, the backup layers' format and blocks) in place.

    For a W8A8 model on targets that want it (`Target.int8_embeddings`): the Gathers compute
    nothing a quantizer would speed up, but the table is most of a small encoder's bytes (MiniLM:
    47 of 90 MB). Returns the report section of `compress_weights`.
    """
    options = CompressionOptions(format=WeightFormat.INT8, group_size=0, backup_layers=True)
    units = [
        unit for unit in plan_compression(model, options, ignored)[0] if unit.role is WeightRole.EMBEDDING
    ]
    return compress_weights(model, units, {}, options, ignored, progress=False)
