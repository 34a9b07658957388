"""The compile driver: load -> normalize -> plan -> calibrate -> insert QDQ -> lower -> check.

`compile` takes and returns models (never touches the disk); files are the CLI's business.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping
from types import ModuleType
from typing import cast

import numpy as np
import onnx
import onnx_ir as ir
from tqdm.auto import tqdm

from qcompiler import calibration, io
from qcompiler.accuracy import AccuracyBudgetError, budget_message, run_search
from qcompiler.backends import backend_for
from qcompiler.calibration import StatKey, StatKind, StatRequest
from qcompiler.data import FeedIterable, input_specs, peek_check
from qcompiler.errors import OptionError
from qcompiler.evaluation import Evaluator, validation_evaluator
from qcompiler.model_checks import check_openvino_input, refuse_quantized, require_opset
from qcompiler.options import (
    CalibrationRuntime,
    CompileOptions,
    CompressionOptions,
    QuantType,
)
from qcompiler.report import Report, peak_rss_mb, versions
from qcompiler.rewrites.compression import (
    compress_embedding_tables,
    compress_weights,
    gram_statistics,
    plan_compression,
    stat_requests,
)
from qcompiler.rewrites.layerwise import LayerwiseCompression
from qcompiler.rewrites.normalize import NormalizePass
from qcompiler.rewrites.placement import plan_quantizers
from qcompiler.rewrites.qdq import InsertQDQPass
from qcompiler.rewrites.smoothing import ApplySmoothingPass, find_groups
from qcompiler.rewrites.smoothquant import choose_alpha
from qcompiler.static_fallback import StaticCandidates, static_groups
from qcompiler.targets import Target, adapt_options, fit_groups, get_target
from qcompiler.weight_budget import BUDGET_GROUP_SIZES, compress_with_budget

DataArg = Iterable[Mapping[str, np.ndarray]]


@dataclasses.dataclass
class CompileResult:
    """The compiled model and the report of how it was made."""

    model: ir.Model
    report: Report
    artifact: object | None = None
    """The target runtime's own model when it is not ONNX (an `openvino.Model` for ``openvino-*``);
    `model` then holds the canonical QDQ / compressed ONNX form it was lowered from."""


def compile(  # noqa: A001 - the public name the design promises
    model: str | os.PathLike[str] | onnx.ModelProto | ir.Model,
    target: str | Target = "ort-cpu",
    options: CompileOptions | None = None,
    *,
    data: DataArg | None = None,
    progress: bool = True,
    in_place: bool = False,
    validation: DataArg | None = None,
) -> CompileResult:
    """Quantize `model` for `target`, calibrating on `data`.

    Args:
        model: a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` (not modified unless
            `in_place`).
        target: a target name such as ``"ort-cpu"`` or a `Target`.
        options: compile options; defaults to ``CompileOptions()``.
        data: calibration batches: a data source from `qcompiler.data` or any iterable of feed
            dicts (input name -> array). A one-shot iterator (a generator) is read into a list
            first, because calibration reads the data more than once.
        progress: show tqdm progress bars.
        in_place: an `onnx_ir.Model` given as `model` is modified and returned instead of copied
            (less memory; the caller gives it up). Paths and protos are always loaded afresh.
        validation: batches the accuracy-aware fallback (`options.accuracy.max_drop`) measures
            on; keep them apart from `data`.

    Raises:
        AccuracyBudgetError: `--max-drop` was not met; its ``result`` holds the best model found.
    """
    resolved = get_target(target)
    options, adaptations = adapt_options((options or CompileOptions()).resolved(), resolved)
    needs_data = options.compression is None or options.compression.needs_data
    if data is None and needs_data:
        raise OptionError(
            "calibration data is required: pass data= (CLI: --data, --text or --synthetic); "
            "only weight-only RTN (--weights without --awq/--scale-estimation/--gptq/--ratio) runs without"
        )
    source = io.load(model)
    report = Report(target=resolved.name, options=options.to_dict())
    report.warnings.extend(f"adapted: {note}" for note in adaptations)
    report.size_bytes["before"] = io.initializer_bytes(source)
    # A model loaded here has no other holder: edit it in place, so each replaced float weight is
    # freed (an LLM's weights are otherwise held twice through compression).
    if isinstance(model, ir.Model) and not in_place:
        working = source.clone()
        working.meta.update(source.meta)
    else:
        working = source
    del source
    if isinstance(data, Iterator):  # later steps read the data again
        data = list(data)
    if data is not None and not hasattr(data, "synthetic"):
        data = FeedIterable(data)
    report.data = {
        "description": getattr(data, "description", ""),
        "synthetic": bool(getattr(data, "synthetic", False)),
    }
    if report.data["synthetic"]:
        report.warnings.append("calibrated on synthetic random inputs: accuracy is not representative")

    refuse_quantized(working)
    require_opset(working, resolved)
    from_openvino = check_openvino_input(working, resolved)
    if data is not None:
        specs = input_specs(working)
        with report.timed("validate_data"):
            peek_check(data, specs, "calibration data")

    _check_accuracy_options(options, validation)

    if not from_openvino:  # OpenVINO IR comes folded, named and typed by OpenVINO
        with report.timed("normalize"):
            # Weight-only compression matches no activation patterns: skip the rewrite rules.
            NormalizePass(rewrite=options.compression is None)(working)
    evaluator = None
    backend = backend_for(resolved.backend)
    if options.accuracy.max_drop is not None:
        assert validation is not None
        with report.timed("validate_float"):
            evaluator = validation_evaluator(working, validation, options.accuracy, runtime=backend.runner)
    if options.compression is not None:
        working = _compress_weights(
            working,
            data,
            options,
            options.compression,
            resolved,
            backend,
            report,
            evaluator,
            progress=progress,
        )
    else:
        assert data is not None
        working = _quantize_static(
            working, data, options, resolved, backend, report, evaluator, progress=progress
        )
    _stamp(working, resolved, options)
    report.size_bytes["after"] = io.initializer_bytes(working)
    artifact = None
    if hasattr(backend, "export"):
        with report.timed("export"):
            artifact, warnings = backend.export(working, resolved)
        report.warnings.extend(warnings)
    report.peak_rss_mb = round(peak_rss_mb(), 1)
    result = CompileResult(working, report, artifact)
    if report.fallback and not report.fallback["met"]:
        raise AccuracyBudgetError(budget_message(report.fallback), result)
    return result


def _check_accuracy_options(options: CompileOptions, validation: DataArg | None) -> None:
    accuracy = options.accuracy
    if accuracy.max_drop is not None and validation is None:
        raise OptionError(
            "--max-drop needs validation data apart from the calibration data: pass --val-data DIR or "
            "--val-text FILE (Python: validation=)"
        )
    if accuracy.size_budget and options.compression is None:
        raise OptionError("--effective-bits / --max-size choose weight formats: add --weights FORMAT")


def _quantize_static(
    working: ir.Model,
    data: DataArg,
    options: CompileOptions,
    resolved: Target,
    backend: ModuleType,
    report: Report,
    evaluator: Evaluator | None,
    *,
    progress: bool,
) -> ir.Model:
    """W8A8: SmoothQuant -> plan -> calibrate -> insert QDQ -> lower -> check.

    With `evaluator` (``--max-drop``), the QDQ model is rebuilt per fallback decision from the
    smoothed float model, and the model of the decision reached is returned.
    """
    activation_type = options.activations.dtype or resolved.activation_type
    known: dict[StatKey, object] = {}
    batches = 0
    if options.smooth_quant.enabled:
        with report.timed("smooth_quant"):
            report.smooth_quant, known, batches = smooth_quant(
                working, data, options, activation_type, progress=progress
            )
    plan = plan_quantizers(working, resolved, options)
    requests = plan.stat_requests(options.activations.range_method, options.activations.sample_rows)  # type: ignore[arg-type]
    missing = [request for request in requests if request.key not in known]
    with report.timed("calibrate"):
        statistics = calibration.Statistics(known, batches)
        if missing:  # a second run over the data only for what SmoothQuant's run did not give
            statistics = calibration.collect(
                working,
                missing,
                data,
                histogram_bins=options.calibration.histogram_bins,
                max_batches=options.calibration.max_batches,
                piece_bytes=options.calibration.piece_bytes,
                progress=progress,
                runtime=options.calibration.runtime or CalibrationRuntime.ONNXRUNTIME,
            ).with_results(known)
    report.data["batches"] = statistics.batches
    report.data["calibration_runs"] = int(bool(options.smooth_quant.enabled)) + int(bool(missing))
    embeddings = None
    # After calibration (onnxruntime's static calibration has no blocked DequantizeLinear before opset
    # 21), before the fallback builds its candidates (their drops then include the tables' rounding).
    if resolved.int8_embeddings:
        with report.timed("embeddings"):
            embeddings = compress_embedding_tables(working, options.ignored)
    if evaluator is not None:
        candidates = StaticCandidates(
            working, static_groups(plan, resolved), resolved, options, statistics, activation_type, backend
        )
        with report.timed("fallback"):
            candidates.proxy(evaluator, options.accuracy.subset_batches)
            start = (0,) * len(candidates.groups)
            result, report.fallback = run_search(
                candidates.groups,
                start,
                lambda decision: candidates.build(decision)[0],
                evaluator,
                options.accuracy,
                progress=progress,
            )
            working, insert = candidates.build(result.decision)
        rungs = {
            name: group.ladder[rung]
            for group, rung in zip(candidates.groups, result.decision, strict=True)
            for name in group.members
        }
        units = [unit for unit in plan.units if rungs[str(unit.node.name)] in ("w8a8", "a8")]
    else:
        insert = InsertQDQPass(
            plan,
            statistics,
            options.activations,
            activation_type,
            resolved.weight_type,
            unified_eltwise_scales=resolved.unified_eltwise_scales,
            unsigned_midpoint=resolved.unsigned_midpoint,
        )
        with report.timed("quantize"):
            insert(working)
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
    if options.count_fusion and quantized_names and hasattr(backend, "count_fusion"):
        with report.timed("count_fusion"):
            report.fusion = backend.count_fusion(working, quantized_names).to_dict()
    return working


def _compress_weights(
    working: ir.Model,
    data: DataArg | None,
    options: CompileOptions,
    compression: CompressionOptions,
    resolved: Target,
    backend: ModuleType,
    report: Report,
    evaluator: Evaluator | None,
    *,
    progress: bool,
) -> ir.Model:
    """Weight-only compression (in place unless a budget is set; returns the model).

    plan -> Gram statistics (if an algorithm needs data) -> AWQ / scale estimation / GPTQ / RTN
    -> canonical DQ form -> packed kernels -> check. With a size budget or ``--max-drop`` the
    formats per group come from `qcompiler.accuracy` instead.
    """
    accuracy = options.accuracy
    if accuracy.size_budget:  # the budget decides the embeddings' and head's formats too
        compression = dataclasses.replace(compression, backup_layers=False)
    units, skipped = plan_compression(working, compression, options.ignored)
    report.warnings.extend(fit_groups(units, resolved))
    planned = units
    if accuracy.size_budget:  # statistics that also tile the smallest group size the budget may pick
        smallest = min(BUDGET_GROUP_SIZES)
        planned = [dataclasses.replace(unit, group_size=smallest) for unit in units]
    requests = stat_requests(planned, compression)
    grams = {}
    layerwise = None
    if requests and not accuracy.enabled and LayerwiseCompression.applies(compression):
        layerwise = LayerwiseCompression(working, units, requests, compression, options.ignored)
    if requests:
        with report.timed("calibrate"):  # with layer-wise compression, compression happens inside
            statistics = calibration.collect(
                working,
                requests,
                data,  # type: ignore[arg-type]
                max_batches=options.calibration.max_batches,
                piece_bytes=options.calibration.piece_bytes,
                progress=progress,
                description="calibrating (weight compression)",
                runtime=options.calibration.runtime or CalibrationRuntime.OPENVINO_FAST,
                on_piece=layerwise,
            )
        report.data["batches"] = statistics.batches
        grams = gram_statistics(statistics, requests)
        del statistics
    if accuracy.enabled:
        working = compress_with_budget(
            working,
            units,
            grams,
            compression,
            options,
            resolved,
            backend,
            report,
            evaluator,
            next(iter(data)) if data is not None else None,
            progress=progress,
        )
    else:
        with report.timed("compress"):
            if layerwise is not None:
                report.compression = layerwise.finish(grams)
            else:
                report.compression = compress_weights(
                    working, units, grams, compression, options.ignored, progress=progress
                )
        del grams
        with report.timed("lower"):
            report.compression["kernels"] = backend.lower_weights(
                working, compression.kernel_accuracy_level, compression.int8_kernel_accuracy_level
            )
            backend.check(working)
    if hasattr(backend, "fuse_decoder"):
        with report.timed("fuse"):  # after any budget search: exact up to float rounding
            report.compression["fused"] = backend.fuse_decoder(working, attention=compression.fuse_attention)
            backend.check(working)
    report.compression["accuracy_level"] = compression.kernel_accuracy_level
    report.compression["int8_accuracy_level"] = compression.int8_kernel_accuracy_level
    report.nodes = {
        "compressed": len(units),
        "by_op_type": dict(collections.Counter(unit.node.op_type for unit in units)),
        "skipped": skipped,
    }
    return working


def smooth_quant(
    model: ir.Model, data: DataArg, options: CompileOptions, activation_type: QuantType, *, progress: bool
) -> tuple[dict[str, dict[str, object]], dict[StatKey, object], int]:
    """Calibrate the smoothing groups (one run), search alpha per group, apply.

    Returns the per-group report, and the per-tensor (min, max) of every tensor the group's
    consumers now read (X / s, exact from the per-channel extremes since s > 0), so the quantizer
    step needs no second run over the data for those tensors; and the number of batches read.
    """
    groups = find_groups(model, options.ignored)
    settings = options.smooth_quant
    requests = []
    for group in groups:
        requests.append(StatRequest.channel_minmax(group.activation))
        requests.append(StatRequest.row_sample(group.activation, settings.sample_rows))
    statistics = calibration.collect(
        model,
        requests,
        data,
        max_batches=options.calibration.max_batches,
        piece_bytes=options.calibration.piece_bytes,
        progress=progress,
        description="calibrating (SmoothQuant)",
        runtime=options.calibration.runtime or CalibrationRuntime.ONNXRUNTIME,
    )
    decisions = []
    summary: dict[str, dict[str, object]] = {}
    ranges: dict[int, tuple[float, float]] = {}
    for group in tqdm(groups, desc="SmoothQuant alpha search", disable=not progress):
        extremes = statistics[StatRequest.channel_minmax(group.activation)]
        lo, hi = cast(tuple[np.ndarray, np.ndarray], extremes)
        rows = cast(
            np.ndarray,
            statistics[StatRequest.row_sample(group.activation, settings.sample_rows)],
        )
        choice = choose_alpha(
            rows,
            lo,
            hi,
            group.weight_rows(),
            settings.grid(),
            activation_type,  # type: ignore[arg-type]
            symmetric=options.activations.symmetric,
        )
        name = str(group.activation.name)
        summary[name] = {
            "consumers": [str(node.name) for node in group.consumers],
            "alpha": choice.alpha,
            "errors": {key: round(value, 6) for key, value in choice.errors.items()},
        }
        scales = choice.scales if choice.scales is not None else 1.0
        ranges[id(group)] = (float(np.min(lo / scales)), float(np.max(hi / scales)))
        if choice.alpha is not None and choice.scales is not None:
            decisions.append((group, choice.scales, f"alpha={choice.alpha:g}"))
    applied = ApplySmoothingPass(decisions)
    applied(model)
    for name, how in applied.outcomes.items():
        summary[name]["applied"] = how
    derived: dict[StatKey, object] = {}
    for group in groups:
        read = group.consumers[0].inputs[0]  # X itself, or the inserted Mul's output
        assert read is not None
        derived[StatRequest(read, StatKind.MINMAX).key] = ranges[id(group)]
    return summary, derived, statistics.batches


def _stamp(model: ir.Model, target: Target, options: CompileOptions) -> None:
    """Record provenance in the model's metadata (visible in Netron's model properties)."""
    model.metadata_props["qcompiler.version"] = versions()["qcompiler"]
    model.metadata_props["qcompiler.target"] = target.name
    if options.compression is not None:
        compression = options.compression
        algorithms = [name for name in ("awq", "scale_estimation", "gptq") if getattr(compression, name)]
        model.metadata_props["qcompiler.weights"] = compression.format.value
        model.metadata_props["qcompiler.weight_group_size"] = str(compression.group_size)
        model.metadata_props["qcompiler.weight_algorithms"] = "+".join(algorithms) or "rtn"
        return
    model.metadata_props["qcompiler.preset"] = options.preset.value
    model.metadata_props["qcompiler.activation_range"] = options.activations.range_method.value  # type: ignore[union-attr]
    model.metadata_props["qcompiler.smooth_quant"] = str(bool(options.smooth_quant.enabled)).lower()
