"""The compile driver: load -> normalize -> plan -> calibrate -> insert QDQ -> lower -> check.

`compile` takes and returns models (never touches the disk); files are the CLI's business.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import onnx
import onnx_ir as ir

from qcompiler import calibration, io
from qcompiler.backends import backend_for
from qcompiler.data import FeedIterable, input_specs, peek_check
from qcompiler.errors import OptionError
from qcompiler.options import CompileOptions
from qcompiler.report import Report, peak_rss_mb, versions
from qcompiler.rewrites.normalize import NormalizePass
from qcompiler.rewrites.placement import plan_quantizers
from qcompiler.rewrites.qdq import InsertQDQPass
from qcompiler.targets import Target, get_target

DataArg = Iterable[Mapping[str, np.ndarray]]


@dataclasses.dataclass
class CompileResult:
    """The compiled model and the report of how it was made."""

    model: ir.Model
    report: Report


def compile(  # noqa: A001 - the public name the design promises
    model: str | os.PathLike[str] | onnx.ModelProto | ir.Model,
    target: str | Target = "ort-cpu",
    options: CompileOptions | None = None,
    *,
    data: DataArg | None = None,
    progress: bool = True,
) -> CompileResult:
    """Quantize `model` for `target`, calibrating on `data`.

    Args:
        model: a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` (never modified).
        target: a target name such as ``"ort-cpu"`` or a `Target`.
        options: compile options; defaults to ``CompileOptions()``.
        data: calibration batches: a data source from `qcompiler.data` or any re-iterable of
            feed dicts (input name -> array). One-shot iterators are validated as they stream.
        progress: show tqdm progress bars.
    """
    options = options or CompileOptions()
    resolved = get_target(target)
    if data is None:
        raise OptionError("calibration data is required: pass data= (CLI: --data, --text or --synthetic)")
    source = io.load(model)
    working = source.clone()
    working.meta.update(source.meta)
    report = Report(target=resolved.name, options=options.to_dict())
    report.size_bytes["before"] = io.initializer_bytes(source)
    if not hasattr(data, "synthetic"):
        data = FeedIterable(data)
    report.data = {
        "description": getattr(data, "description", ""),
        "synthetic": bool(getattr(data, "synthetic", False)),
    }
    if report.data["synthetic"]:
        report.warnings.append("calibrated on synthetic random inputs: accuracy is not representative")

    specs = input_specs(working)
    if not isinstance(data, Iterator):
        with report.timed("validate_data"):
            peek_check(data, specs, "calibration data")

    with report.timed("normalize"):
        NormalizePass()(working)
    plan = plan_quantizers(working, resolved, options)
    requests = plan.stat_requests(options.activations.range_method)
    with report.timed("calibrate"):
        statistics = calibration.collect(
            working,
            requests,
            data,
            histogram_bins=options.calibration.histogram_bins,
            max_batches=options.calibration.max_batches,
            progress=progress,
        )
    report.data["batches"] = statistics.batches
    activation_type = options.activations.dtype or resolved.activation_type
    insert = InsertQDQPass(plan, statistics, options.activations, activation_type, resolved.weight_type)
    with report.timed("quantize"):
        insert(working)
    backend = backend_for(resolved.backend)
    with report.timed("lower"):
        backend.lower(working)
        backend.check(working)
    quantized_names = [str(unit.node.name) for unit in plan.units]
    report.nodes = {
        "quantized": len(plan.units),
        "by_op_type": dict(collections.Counter(unit.node.op_type for unit in plan.units)),
        "skipped": plan.skipped,
    }
    report.activation_quantizers = {
        name: dataclasses.asdict(params) for name, params in insert.quantizers.items()
    }
    if options.count_fusion and quantized_names:
        with report.timed("count_fusion"):
            report.fusion = backend.count_fusion(working, quantized_names).to_dict()
    _stamp(working, resolved, options)
    report.size_bytes["after"] = io.initializer_bytes(working)
    report.peak_rss_mb = round(peak_rss_mb(), 1)
    return CompileResult(working, report)


def _stamp(model: ir.Model, target: Target, options: CompileOptions) -> None:
    """Record provenance in the model's metadata (visible in Netron's model properties)."""
    model.metadata_props["qcompiler.version"] = versions()["qcompiler"]
    model.metadata_props["qcompiler.target"] = target.name
    model.metadata_props["qcompiler.preset"] = options.preset.value
    model.metadata_props["qcompiler.activation_range"] = options.activations.range_method.value
    model.meta.pop(io.SOURCE_PATH_KEY, None)
