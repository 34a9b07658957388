"""The weight-only stages: plan -> Gram statistics (streamed piece by piece) -> compress -> lower -> check -> fuse."""

from __future__ import annotations

import collections
import dataclasses

import onnx_ir as ir

from qcompiler import calibration
from qcompiler.calibration import Statistics, StatKey, StatRequest
from qcompiler.drivers.context import CompileContext, DataArg
from qcompiler.drivers.weight_budget import BUDGET_GROUP_SIZES, compress_with_budget
from qcompiler.options import CalibrationRuntime, CompressionOptions
from qcompiler.rewrites.compression import awq_spans, compress_weights, gram_statistics
from qcompiler.rewrites.layerwise import LayerwiseCompression
from qcompiler.rewrites.weight_plan import WeightUnit, plan_compression, stat_requests
from qcompiler.targets import Target, fitted_group_size


def compress(working: ir.Model, data: DataArg | None, context: CompileContext) -> ir.Model:
    """Weight-only compression (in place unless a budget is set; returns the model).

    With a size budget or ``--max-drop`` the formats per group come from `weight_budget` instead.
    """
    options, report, backend = context.options, context.report, context.backend
    compression = options.compression
    assert compression is not None
    accuracy = options.accuracy
    if accuracy.size_budget:  # the budget decides the embeddings' and head's formats too
        compression = dataclasses.replace(compression, backup_layers=False)
    units, skipped = plan_compression(working, compression, options.ignored)
    report.warnings.extend(fit_groups(units, context.target))
    planned = units
    if accuracy.size_budget:  # statistics that also tile the smallest group size the budget may pick
        smallest = min(BUDGET_GROUP_SIZES)
        planned = [dataclasses.replace(unit, group_size=smallest) for unit in units]
    requests = stat_requests(planned, compression)
    layerwise = None
    if requests and not accuracy.enabled and LayerwiseCompression.applies(compression):
        layerwise = LayerwiseCompression(working, units, requests, compression, options.ignored)
    grams = {}
    if requests:
        assert data is not None
        with report.timed("calibrate"):  # with layer-wise compression, compression happens here
            statistics = _calibrate(working, requests, data, context, layerwise)
        report.data["batches"] = statistics.batches
        grams = gram_statistics(statistics, requests)
        del statistics
    if accuracy.enabled:
        working = compress_with_budget(
            working, units, grams, compression, context, next(iter(data)) if data is not None else None
        )
    else:
        with report.timed("compress"):
            if layerwise is not None:
                report.compression = layerwise.finish(grams)
            else:
                report.compression = compress_weights(
                    working, units, grams, compression, options.ignored, progress=context.progress
                )
        del grams
        with report.timed("lower"):
            report.compression["kernels"] = backend.lower_weights(
                working, compression.kernel_accuracy_level, compression.int8_kernel_accuracy_level
            )
            backend.check(working)
    if backend.capabilities.fuses_decoder:
        with report.timed("fuse"):  # after any budget search: exact up to float rounding
            report.compression["fused"] = backend.fuse_decoder(working, attention=compression.fuse_attention)
            backend.check(working)
    _report_nodes(context, compression, units, skipped)
    return working


def _calibrate(
    model: ir.Model,
    requests: list[StatRequest],
    data: DataArg,
    context: CompileContext,
    layerwise: LayerwiseCompression | None,
) -> Statistics:
    """Gram statistics, streamed piece by piece.

    With layer-wise compression each finished piece's weights are compressed and its statistics
    dropped before the next piece runs; what is returned is what no piece handed over.
    """
    runners = context.calibration_runners(model, CalibrationRuntime.OPENVINO_FAST)
    settings = context.calibration_settings("calibrating (weight compression)")
    compression = context.options.compression
    if compression is not None and compression.awq:  # no piece cut splits an AWQ group
        settings = dataclasses.replace(settings, together=awq_spans(model, context.options.ignored))
    kept: dict[StatKey, object] = {}
    batches = 0
    for finished in calibration.stream(model, requests, data, runners, settings):
        batches = max(batches, finished.batches)
        if layerwise is not None:
            layerwise(finished)
        else:
            kept.update(finished.results)
    return Statistics(kept, batches)


def fit_groups(units: list[WeightUnit], target: Target) -> list[str]:
    """Each unit's group size made one `target` runs (`targets.fitted_group_size`); a report line per change."""
    changed: dict[str, list[str]] = {}
    for unit in units:
        fitted = fitted_group_size(target, unit.format, unit.group_size, unit.rows)
        if fitted != unit.group_size:
            unit.group_size = fitted
            changed.setdefault(f"group {fitted}" if fitted else "per channel", []).append(str(unit.node.name))
    return [
        f"adapted: {len(names)} weight(s) {how} on {target.name}: the group does not divide their input "
        f"size or the device does not run it (first: {names[0]})"
        for how, names in changed.items()
    ]


def _report_nodes(
    context: CompileContext, compression: CompressionOptions, units: list[WeightUnit], skipped: dict[str, str]
) -> None:
    report = context.report
    report.compression["accuracy_level"] = compression.kernel_accuracy_level
    report.compression["int8_accuracy_level"] = compression.int8_kernel_accuracy_level
    report.nodes = {
        "compressed": len(units),
        "by_op_type": dict(collections.Counter(unit.node.op_type for unit in units)),
        "skipped": skipped,
    }
