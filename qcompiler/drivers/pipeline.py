"""The compile driver: load -> check -> normalize -> [evaluator] -> W8A8 or weight-only stages -> stamp -> export.

`compile` takes and returns models (never touches the disk); files are the CLI's business.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
from collections.abc import Iterator

import onnx
import onnx_ir as ir

from qcompiler import decompression, io, model_validation, precision
from qcompiler.data import FeedIterable, input_specs, peek_check
from qcompiler.drivers.accuracy import budget_message
from qcompiler.drivers.context import CompileContext, DataArg
from qcompiler.drivers.static import quantize_static
from qcompiler.drivers.weights import compress
from qcompiler.errors import AccuracyBudgetError, OptionError, UnsupportedModelError
from qcompiler.evaluation import validation_evaluator
from qcompiler.frontends import openvino_ir
from qcompiler.model_checks import (
    check_openvino_input,
    refuse_quantized,
    refuse_unknown_ops,
    refuse_unrunnable_precision,
    relax_nonpositive_dims,
    upgrade_old_opset,
)
from qcompiler.options import CompileOptions
from qcompiler.registry import backend_for
from qcompiler.report import Report, peak_rss_mb, versions
from qcompiler.rewrites.normalize import NormalizePass
from qcompiler.targets import Target, adapt_options, get_target


@dataclasses.dataclass
class CompileResult:
    """The compiled model and the report of how it was made."""

    model: ir.Model
    report: Report
    artifact: object | None = None
    """The target runtime's own model when it is not ONNX (an `openvino.Model` for ``openvino-*``);
    `model` then holds the canonical QDQ / compressed ONNX form it was lowered from."""
    target: Target | None = None
    """The target compiled for (None: the one the report names)."""

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        external_data: bool | None = None,
        protected: tuple[str | os.PathLike[str], ...] = (),
    ) -> pathlib.Path:
        """Write the target's artifact (``.xml`` + ``.bin`` for OpenVINO, else the ONNX model) atomically."""
        backend = backend_for(self.target or self.report.target)
        return backend.save(self.model, self.artifact, path, external_data=external_data, protected=protected)


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
    # adapted before the preset fills its defaults: a target may choose where the user did not
    options, adaptations = adapt_options(options or CompileOptions(), resolved)
    options = options.resolved()
    _check_options(options, data, validation)
    source = io.load(model)
    context = CompileContext(
        target=resolved,
        backend=backend_for(resolved),
        options=options,
        report=Report(target=resolved.name, options=options.to_dict()),
        source_format=io.source_format(source),
        progress=progress,
    )
    report = context.report
    report.warnings.extend(f"adapted: {note}" for note in adaptations)
    with report.timed("validate_model"):  # before anything reads a tensor's size or bytes
        model_validation.validate(source, str(source.meta.get(io.SOURCE_PATH_KEY, "the model")))
    report.size_bytes["before"] = io.initializer_bytes(source)
    # A model loaded here has no other holder: edit it in place, so each replaced float weight is
    # freed (an LLM's weights are otherwise held twice through compression).
    working = io.clone(source) if isinstance(model, ir.Model) and not in_place else source
    del source
    data = _calibration_data(data, report)
    _check_model(working, data, context)
    onnx_source = context.source_format is not io.SourceFormat.OPENVINO_IR
    if onnx_source:  # IR comes folded, named and typed (and its decompression lifted by the frontend)
        with report.timed("normalize"):
            # before the optimizer folds small Casts of FP16 weights into FP32 initializers
            report.model["decompression_lifted"] = decompression.lift_decompression(working)
            # Weight-only compression matches no activation patterns: skip the rewrite rules.
            NormalizePass(rewrite=options.compression is None)(working)
    if options.accuracy.max_drop is not None:
        assert validation is not None
        with report.timed("validate_float"):
            context.evaluator = validation_evaluator(
                working, validation, options.accuracy, context.target_runners
            )
    if options.compression is not None:
        working = compress(working, data, context)
    else:
        assert data is not None
        working = quantize_static(working, data, context)
    _require_work(working, report)
    report.model["decompression_restored"] = decompression.restore_decompression(
        working, decompression.onnx_cast if onnx_source else openvino_ir.convert_node
    )
    report.warnings.extend(context.backend.finalize(working))
    _stamp(working, resolved, options)
    report.size_bytes["after"] = io.initializer_bytes(working)
    artifact = None
    if not context.backend.capabilities.artifact_is_onnx:
        with report.timed("export"):
            artifact, warnings = context.backend.export(working, resolved)
        report.warnings.extend(warnings)
    report.peak_rss_mb = round(peak_rss_mb(), 1)
    result = CompileResult(working, report, artifact, resolved)
    if report.fallback.get("met_within_noise"):
        high = report.fallback["drop_interval"][1]  # type: ignore[index]
        report.warnings.append(
            f"--max-drop {report.fallback['max_drop']} met only within noise: the drop's "
            f"{report.fallback['interval_confidence']:.0%} interval reaches {high:.4g}; more validation data "
            "(--val-samples) would tell"
        )
    if report.fallback and not report.fallback["met"]:
        raise AccuracyBudgetError(budget_message(report.fallback), result)
    return result


def _check_options(options: CompileOptions, data: DataArg | None, validation: DataArg | None) -> None:
    needs_data = options.compression is None or options.compression.needs_data
    if data is None and needs_data:
        raise OptionError(
            "calibration data is required: pass data= (CLI: --data, --text or --synthetic); "
            "only weight-only RTN (--weights without --awq/--scale-estimation/--gptq/--ratio) runs without"
        )
    accuracy = options.accuracy
    if accuracy.max_drop is not None and validation is None:
        raise OptionError(
            "--max-drop needs validation data apart from the calibration data: pass --val-data DIR or "
            "--val-text FILE (Python: validation=)"
        )
    if accuracy.size_budget and options.compression is None:
        raise OptionError("--effective-bits / --max-size choose weight formats: add --weights FORMAT")


def _calibration_data(data: DataArg | None, report: Report) -> DataArg | None:
    """The data as something calibration can read more than once; its description in the report."""
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
    return data


def _check_model(model: ir.Model, data: DataArg | None, context: CompileContext) -> None:
    """The input model and the first batch, before any work; an old opset is upgraded here."""
    refuse_quantized(model)
    relaxed = relax_nonpositive_dims(model)
    if relaxed:
        context.report.warnings.append(f"inputs {relaxed}: declared sizes <= 0 read as dynamic axes")
    check_openvino_input(model, context.target, context.backend.capabilities.runs_openvino_ir)
    refuse_unknown_ops(model, context.target, context.backend.unknown_ops(model))
    refuse_unrunnable_precision(model, context.target, context.backend.capabilities.precisions)
    found = precision.model_precision(model)
    context.report.model.update(
        precision=precision.precision_name(found), opset=model.opset_imports.get("", None)
    )
    model.metadata_props[precision.PRECISION_KEY] = precision.precision_name(found)
    with context.report.timed("upgrade_opset"):
        upgraded = upgrade_old_opset(model, context.target)
    if upgraded:
        context.report.model["opset_upgraded_to"] = model.opset_imports.get("")
        context.report.warnings.append(upgraded)
    if data is not None:
        with context.report.timed("validate_data"):
            peek_check(data, input_specs(model), "calibration data")


def _require_work(model: ir.Model, report: Report) -> None:
    """A compile that quantized or compressed nothing is an error naming the commonest reason.

    A `--max-drop` search that kept everything float is the budget's answer, not a no-op.
    """
    done = report.nodes.get("quantized", 0) or report.nodes.get("compressed", 0)
    if done or report.fallback or (report.compression or {}).get("layers"):
        return
    skipped: dict[str, str] = report.nodes.get("skipped", {})  # type: ignore[assignment]
    source = model.meta.get(io.SOURCE_PATH_KEY, "the model")
    if not skipped:
        raise UnsupportedModelError(
            f"{source}: nothing to quantize or compress for {report.target}: the model has no node the "
            "options select (MatMul / Gemm / Conv with a constant weight; see --op-types, --preset)"
        )
    reasons = collections.Counter(skipped.values())
    reason, count = reasons.most_common(1)[0]
    first = next(name for name, why in skipped.items() if why == reason)
    raise UnsupportedModelError(
        f"{source}: nothing was quantized or compressed for {report.target}: {count} of {len(skipped)} "
        f"candidate nodes skipped because {reason} (first: {first!r})"
    )


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
