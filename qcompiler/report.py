"""The compile report: what was quantized and fused, sizes, timings, options and versions.

Written as JSON next to the output model, and summarised as a short table on the terminal.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.metadata
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from qcompiler import errors

RUN_NOTE = "differs between identical compiles: wall times, memory, library versions"
"""The ``run`` section's own description, written into every report."""

VERSIONED = ("qcompiler", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy")


def versions() -> dict[str, str]:
    """Installed versions of qcompiler and the libraries that shape its output."""
    found = {}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB.

    Linux's VmHWM is read first: unlike ru_maxrss it is not inherited across exec, so a child
    started by a large parent reports its own peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclasses.dataclass
class Report:
    """Accumulates the facts of one compile; `to_dict` is the JSON written beside the model."""

    target: str
    options: dict[str, object]
    data: dict[str, object] = dataclasses.field(default_factory=dict)
    timings_s: dict[str, float] = dataclasses.field(default_factory=dict)
    nodes: dict[str, object] = dataclasses.field(default_factory=dict)
    fusion: dict[str, object] | None = None
    size_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    activation_quantizers: dict[str, dict[str, object]] = dataclasses.field(default_factory=dict)
    smooth_quant: dict[str, dict[str, object]] = dataclasses.field(default_factory=dict)
    bias_correction: dict[str, dict[str, object]] = dataclasses.field(default_factory=dict)
    """Per Conv: the largest and mean |shift| folded into its bias, or why it was left alone."""
    compression: dict[str, object] = dataclasses.field(default_factory=dict)
    fallback: dict[str, object] = dataclasses.field(default_factory=dict)
    mixed_precision: dict[str, object] = dataclasses.field(default_factory=dict)
    model: dict[str, object] = dataclasses.field(default_factory=dict)
    """The input as found: precision, opset (and whether it was upgraded), decompression lifted."""
    peak_rss_mb: float = 0.0
    warnings: list[str] = dataclasses.field(default_factory=list)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Record the wall time of a pipeline stage (and name it in an unexpected error raised inside)."""
        start = time.perf_counter()
        try:
            with errors.context(stage=stage):
                yield
        finally:
            self.timings_s[stage] = round(time.perf_counter() - start, 3)

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly view; what differs between two identical compiles is in its ``run`` section.

        Everything else (decisions, statistics, sizes, scores) is the same bytes for the same
        input, options and library versions.
        """
        result = dataclasses.asdict(self)
        run: dict[str, object] = {"note": RUN_NOTE}
        run["timings_s"] = {**result.pop("timings_s"), "total": round(sum(self.timings_s.values()), 3)}
        run["peak_rss_mb"] = result.pop("peak_rss_mb")
        fallback = result["fallback"]
        if fallback:
            run["fallback_seconds"] = fallback.pop("seconds", None)
            run["trial_seconds"] = [trial.pop("seconds", None) for trial in fallback.get("trials", [])]
        run["versions"] = versions()
        result["run"] = run
        return result

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def _compression_rows(self) -> list[tuple[str, str]]:
        layers = cast(dict[str, dict[str, object]], self.compression.get("layers", {}))
        formats = collections.Counter(str(entry["how"]).split(";")[0] for entry in layers.values())
        rows = [("compressed weights", f"{len(layers)} {dict(formats)}")]
        awq = cast(dict[str, dict[str, object]], self.compression.get("awq", {}))
        if awq:
            folded = sum(str(group.get("applied", "")).startswith("folded") for group in awq.values())
            rows.append(("AWQ", f"{folded} of {len(awq)} input groups scaled"))
        kernels = cast(dict[str, str], self.compression.get("kernels", {}))
        if kernels:
            level = self.compression.get("accuracy_level")
            rows.append(
                ("runtime kernels", f"{dict(collections.Counter(kernels.values()))}, accuracy_level {level}")
            )
        return rows

    def summary(self) -> str:
        """A short table for the terminal."""
        before = self.size_bytes.get("before", 0) / 2**20
        after = self.size_bytes.get("after", 0) / 2**20
        rows = [
            ("target", self.target),
            ("data", str(self.data.get("description", ""))),
        ]
        if self.model:
            opset = self.model.get("opset")
            upgraded = self.model.get("opset_upgraded_to")
            line = str(self.model.get("precision"))
            if opset is not None:  # OpenVINO IR has none
                line += f", opset {opset}" + (f" -> {upgraded}" if upgraded else "")
            rows.append(("model", line))
        if not self.compression:
            rows.append(
                ("quantized nodes", f"{self.nodes.get('quantized', 0)} ({self.nodes.get('by_op_type', {})})")
            )
        skipped: dict[str, str] = self.nodes.get("skipped", {})  # type: ignore[assignment]
        rows.append(("left in float", str(len(skipped))))
        for reason, count in collections.Counter(skipped.values()).most_common():
            rows.append(("  skipped", f"{count} x {reason}"))
        if self.smooth_quant:
            smoothed = [g for g in self.smooth_quant.values() if g.get("alpha") is not None]
            inserted = sum("Mul inserted" in str(g.get("applied", "")) for g in smoothed)
            rows.append(
                (
                    "SmoothQuant",
                    f"{len(smoothed)} of {len(self.smooth_quant)} groups smoothed ({inserted} with an inserted Mul)",
                )
            )
        if self.bias_correction:
            corrected = sum("max_abs_shift" in entry for entry in self.bias_correction.values())
            rows.append(("bias correction", f"{corrected} of {len(self.bias_correction)} Convs corrected"))
        if self.activation_quantizers:
            methods: dict[str, int] = {}
            for quantizer in self.activation_quantizers.values():
                methods[str(quantizer["method"])] = methods.get(str(quantizer["method"]), 0) + 1
            rows.append(("activation ranges", str(methods)))
        if self.compression:
            rows.extend(self._compression_rows())
        if self.mixed_precision:
            mp = self.mixed_precision
            rows.append(
                (
                    "size budget",
                    f"{mp['achieved_effective_bits']} bits/weight, {mp['achieved_mb']} MB of {mp['requested_mb']} MB "
                    f"{mp['groups_by_rung']}",
                )
            )
        if self.fallback:
            fb = self.fallback
            groups = cast(dict[str, dict[str, Any]], fb["groups"])
            moved = [name for name, g in groups.items() if g["format"] != g["ladder"][0]]
            met = (
                "NOT met"
                if not fb["met"]
                else "met only within noise"
                if fb.get("met_within_noise")
                else "met"
            )
            rows.append(
                (
                    "accuracy fallback",
                    f"{fb['metric']} {fb['float_score']:.5g} -> {fb['score']:.5g}, {fb['drop_type']} drop "
                    f"{fb['drop']:.4g} (max {fb['max_drop']}"
                    f"{f' - margin {margin}' if (margin := fb.get('drop_margin')) else ''}, {met}); "
                    f"{len(fb['trials'])} trials, {fb['seconds']} s; {len(moved)} groups moved up",  # type: ignore[arg-type]
                )
            )
            if "drop_interval" in fb:
                interval = cast(list[float], fb["drop_interval"])
                validation = cast(dict[str, object], fb["validation"])
                rows.append(
                    (
                        "  measured on",
                        f"{_validation_line(validation)}; drop {interval[0]:.4g} .. {interval[1]:.4g} "
                        f"({fb['interval_confidence']:.0%} bootstrap interval)",
                    )
                )
        if self.fusion is not None:
            rows.append(
                (
                    "fused by runtime",
                    f"{self.fusion['fused']} of {self.nodes.get('quantized', 0)} {self.fusion['kernels']}",
                )
            )
        rows += [
            ("size", f"{before:.1f} MB -> {after:.1f} MB"),
            ("time", f"{sum(self.timings_s.values()):.1f} s"),
            ("peak RSS", f"{self.peak_rss_mb:.0f} MB"),
        ]
        rows += [("warning", warning) for warning in self.warnings]
        width = max(len(key) for key, _ in rows)
        return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def _validation_line(validation: dict[str, object]) -> str:
    """``128 batches, 128 samples of 512 tokens`` (the data a --max-drop was measured on)."""
    line = f"{validation['batches']} batches, {validation['samples']} samples"
    if "context_tokens" in validation:
        line += f" of {validation['context_tokens']} tokens"
    return line
