"""The W8A8 stages: SmoothQuant -> plan -> calibrate -> [embeddings] -> insert QDQ -> lower -> check.

With ``--max-drop`` a fallback search replaces insert-and-lower; without it, bias correction runs
between inserting QDQ and lowering.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx_ir as ir

from qcompiler import calibration
from qcompiler.calibration import StatKey
from qcompiler.drivers.accuracy import run_search
from qcompiler.drivers.context import CompileContext, DataArg
from qcompiler.drivers.static_fallback import StaticCandidates, static_groups
from qcompiler.options import CalibrationRuntime, QuantType
from qcompiler.rewrites import bias_correction
from qcompiler.rewrites.compression import compress_embedding_tables
from qcompiler.rewrites.placement import QuantizedUnit, plan_quantizers
from qcompiler.rewrites.qdq import InsertQDQPass
from qcompiler.rewrites.smoothing import apply_smoothquant, find_groups, smoothquant_requests


def quantize_static(working: ir.Model, data: DataArg, context: CompileContext) -> ir.Model:
    """W8A8 in place; returns the model.

    With an evaluator (``--max-drop``), the QDQ model is rebuilt per fallback decision from the
    smoothed float model, and the model of the decision reached is returned.
    """
    options, target, report, backend = context.options, context.target, context.report, context.backend
    activation_type = options.activations.dtype or target.activation_type
    known: dict[StatKey, object] = {}
    batches = 0
    if options.smooth_quant.enabled:
        with report.timed("smooth_quant"):
            report.smooth_quant, known, batches = smooth_quant(working, data, context, activation_type)
    plan = plan_quantizers(working, target, options)
    requests = plan.stat_requests(options.activations.range_method, options.activations.sample_rows)  # type: ignore[arg-type]
    missing = [request for request in requests if request.key not in known]
    with report.timed("calibrate"):
        statistics = calibration.Statistics(known, batches)
        if missing:  # a second run over the data only for what SmoothQuant's run did not give
            statistics = context.collect(
                working,
                missing,
                data,
                CalibrationRuntime.ONNXRUNTIME,
                histogram_bins=options.calibration.histogram_bins,
            ).with_results(known)
    report.data["batches"] = statistics.batches
    report.data["calibration_runs"] = int(bool(options.smooth_quant.enabled)) + int(bool(missing))
    embeddings = None
    # After calibration (onnxruntime's static calibration has no blocked DequantizeLinear before opset
    # 21), before the fallback builds its candidates (their drops then include the tables' rounding).
    if target.int8_embeddings:
        with report.timed("embeddings"):
            embeddings = compress_embedding_tables(working, options.ignored)
    if context.evaluator is not None:
        candidates = StaticCandidates(
            working, static_groups(plan, target), target, options, statistics, activation_type, backend
        )
        with report.timed("fallback"):
            candidates.proxy(context.evaluator, options.accuracy.subset_batches)
            start = (0,) * len(candidates.groups)
            result, report.fallback = run_search(
                candidates.groups,
                start,
                lambda decision: candidates.build(decision)[0],
                context.evaluator,
                options.accuracy,
                progress=context.progress,
            )
            working, insert = candidates.build(result.decision)
        rungs = candidates.rung_of(result.decision)
        units = [unit for unit in plan.units if rungs[str(unit.node.name)] in ("w8a8", "a8")]
    else:
        insert = InsertQDQPass(
            plan,
            statistics,
            options.activations,
            activation_type,
            target.weight_type_for(activation_type),
            unified_eltwise_scales=target.unified_eltwise_scales,
            unsigned_midpoint=target.unsigned_midpoint,
        )
        weights = bias_correction.float_weights(plan.units) if options.activations.bias_correction else {}
        with report.timed("quantize"):
            insert(working)
        if weights:
            with report.timed("bias_correction"):
                report.bias_correction = correct_biases(working, plan.units, weights, insert, data, context)
        with report.timed("lower"):
            backend.lower(working)
            backend.check(working)
        units = plan.units
    if embeddings is not None:
        embeddings["kernels"] = backend.lower_weights(working, 0, 0)
        report.compression = embeddings
    quantized_names = [str(unit.node.name) for unit in units]
    report.nodes = {
        "quantized": len(units),
        "by_op_type": dict(collections.Counter(unit.node.op_type for unit in units)),
        "skipped": plan.skipped,
    }
    report.activation_quantizers = {
        name: dataclasses.asdict(params) for name, params in insert.quantizers.items()
    }
    if options.count_fusion and quantized_names and backend.capabilities.counts_fusion:
        with report.timed("count_fusion"):
            report.fusion = backend.count_fusion(working, quantized_names)
    return working


def correct_biases(
    model: ir.Model,
    units: list[QuantizedUnit],
    weights: dict[str, ir.TensorProtocol],
    insert: InsertQDQPass,
    data: DataArg,
    context: CompileContext,
) -> dict[str, dict[str, object]]:
    """Measure the QDQ model's per-channel input means (one run) and fold each Conv's shift into its bias."""
    sites, skipped = bias_correction.correction_sites(units, weights, insert.quantizers)
    summary: dict[str, dict[str, object]] = {name: {"skipped": reason} for name, reason in skipped.items()}
    if not sites:
        return summary
    requests = [request for site in sites for request in site.requests()]
    statistics = context.collect(
        model, requests, data, CalibrationRuntime.ONNXRUNTIME, description="calibrating (bias correction)"
    )
    for site in sites:
        shift = bias_correction.output_shift(site, statistics)
        bias_correction.apply(model.graph, site, shift)
        summary[str(site.node.name)] = {
            "max_abs_shift": round(float(np.abs(shift).max()), 6),
            "mean_abs_shift": round(float(np.abs(shift).mean()), 6),
        }
    return summary


def smooth_quant(
    model: ir.Model, data: DataArg, context: CompileContext, activation_type: QuantType
) -> tuple[dict[str, dict[str, object]], dict[StatKey, object], int]:
    """Calibrate the smoothing groups (one run), then search and apply (`apply_smoothquant`).

    Returns the per-group report, the ranges of the tensors the groups' consumers now read, and
    the number of batches read.
    """
    options = context.options
    groups = find_groups(model, options.ignored)
    requests = smoothquant_requests(groups, options.smooth_quant)
    statistics = context.collect(
        model, requests, data, CalibrationRuntime.ONNXRUNTIME, description="calibrating (SmoothQuant)"
    )
    summary, derived = apply_smoothquant(
        model,
        groups,
        statistics,
        options.smooth_quant,
        activation_type,
        symmetric=bool(options.activations.symmetric),
        progress=context.progress,
    )
    return summary, derived, statistics.batches
