"""W8A8 on all-MiniLM-L6-v2: qcompiler beside onnxruntime's quantize_static and NNCF, in one run.

Every tool gets the same 300 calibration paragraphs (python-docs train slice, one sentence per
feed) and every artifact is measured the same way in this process: sentence-embedding cosine vs
FP32 on 600 held-out paragraphs (test slice), ORT CPU latency at 1x128 and 8x128 (2 threads,
median of 20), file size. Each tool compiles in its own subprocess so its wall time and peak RSS
are its own.

    python benchmarks/minilm_w8a8.py [--tools qcompiler,ort-matmul,...] [--out benchmarks/results]

Needs the ``bench`` extra (NNCF). Writes ``results/minilm_w8a8.json`` and the table in
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOLS = {
    "qcompiler": "qcompiler transformer preset, MinMax, U8 act / S8 per-channel weights",
    "ort-all": "onnxruntime quantize_static QDQ S8S8 MinMax, all ops",
    "ort-matmul": "onnxruntime quantize_static QDQ U8S8 MinMax, MatMul only, per-channel",
    "nncf": "NNCF quantize (ONNX) model_type=TRANSFORMER (SmoothQuant on)",
    "nncf-nosq": "NNCF quantize (ONNX) model_type=TRANSFORMER, SmoothQuant off",
}


def load_feeds(folder: pathlib.Path) -> list[dict[str, np.ndarray]]:
    """Calibration feeds saved by the parent, in order."""
    feeds = []
    for file in sorted(folder.glob("*.npz"), key=lambda p: int(p.stem)):
        with np.load(file, allow_pickle=False) as archive:
            feeds.append({key: archive[key] for key in archive.files})
    return feeds


def compile_with(
    tool: str, model_path: pathlib.Path, calibration: pathlib.Path, output: pathlib.Path
) -> None:
    """Run one tool; writes `output`."""
    import onnx

    feeds = load_feeds(calibration)
    if tool == "qcompiler":
        import qcompiler

        options = qcompiler.CompileOptions(preset=qcompiler.Preset.TRANSFORMER, count_fusion=False)
        result = qcompiler.compile(model_path, "ort-cpu", options, data=feeds, progress=False)
        qcompiler.save(result.model, output)
    elif tool in ("ort-all", "ort-matmul"):
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.iterator = iter(feeds)

            def get_next(self):
                return next(self.iterator, None)

        if tool == "ort-all":
            quantize_static(
                str(model_path),
                str(output),
                Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
            )
        else:
            quantize_static(
                str(model_path),
                str(output),
                Reader(),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul"],
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
    elif tool in ("nncf", "nncf-nosq"):
        import nncf

        advanced = None
        if tool == "nncf-nosq":
            advanced = nncf.AdvancedQuantizationParameters(
                smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1)
            )
        quantized = nncf.quantize(
            onnx.load(model_path),
            nncf.Dataset(feeds),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(feeds),
            advanced_parameters=advanced,
        )
        onnx.save(quantized, output)
    else:
        raise SystemExit(f"unknown tool {tool}")


def worker(args: argparse.Namespace) -> None:
    """Child process: compile, then print wall time and own peak RSS as JSON."""
    start = time.perf_counter()
    compile_with(args.worker, args.model, args.calibration, args.output)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mb": round(peak, 1)}))


def latency(path: pathlib.Path, batch: int, seq: int = 128) -> float:
    from qcompiler.backends.onnxruntime.session import create_session, median_latency_ms, session_options

    rng = np.random.default_rng(0)
    feed = {
        "input_ids": rng.integers(1000, 20000, (batch, seq)),
        "attention_mask": np.ones((batch, seq), np.int64),
        "token_type_ids": np.zeros((batch, seq), np.int64),
    }
    return median_latency_ms(create_session(path, session_options(threads=2)), feed, repeats=20)


def integer_kernels(path: pathlib.Path) -> dict[str, int]:
    """Integer kernels in ORT's optimized graph, and MatMuls with constant weights left float."""
    import qcompiler
    from qcompiler.backends.onnxruntime.fusion import FUSED_OP_TYPES, optimized_graph

    graph = optimized_graph(qcompiler.load(path)).graph
    fused = sum(node.op_type in FUSED_OP_TYPES for node in graph)
    float_weighted = sum(
        node.op_type in ("MatMul", "Gemm", "FusedMatMul")
        and any(v is not None and v.const_value is not None for v in node.inputs[1:2])
        for node in graph
    )
    return {"integer_kernels": fused, "float_weighted_matmuls": float_weighted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tools", default=",".join(TOOLS), help="comma-separated subset of " + ", ".join(TOOLS)
    )
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=pathlib.Path, help=argparse.SUPPRESS)
    parser.add_argument("--calibration", type=pathlib.Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import qcompiler
    from qcompiler.data import TextSource, input_specs
    from qcompiler.metrics import fidelity, run_outputs
    from qcompiler.models import CALIBRATION_TEXT, EVALUATION_TEXT, minilm
    from qcompiler.report import versions

    model_path = minilm.build()
    specs = input_specs(qcompiler.load(model_path))
    tokenizer = minilm.tokenizer_path()
    evaluation = list(TextSource(EVALUATION_TEXT, tokenizer, specs, samples=600, batch_size=16))
    reference = run_outputs(qcompiler.load(model_path), evaluation, "sentence_embedding")
    fp32 = {"1x128_ms": latency(model_path, 1), "8x128_ms": latency(model_path, 8)}
    rows = {
        "fp32": {
            "description": "FP32 reference",
            "size_mb": round(model_path.stat().st_size / 2**20, 1),
            **{k: round(v, 2) for k, v in fp32.items()},
        }
    }
    with tempfile.TemporaryDirectory(prefix="qcompile-bench-") as folder:
        work = pathlib.Path(folder)
        calibration = work / "calibration"
        calibration.mkdir()
        for index, feed in enumerate(
            TextSource(CALIBRATION_TEXT, tokenizer, specs, samples=300, batch_size=1)
        ):
            np.savez(calibration / f"{index}.npz", **feed)
        for tool in args.tools.split(","):
            output = work / f"{tool}.onnx"
            command = [
                sys.executable,
                __file__,
                "--worker",
                tool,
                "--model",
                str(model_path),
                "--calibration",
                str(calibration),
                "--output",
                str(output),
            ]
            process = subprocess.run(command, capture_output=True, text=True, check=False)
            if process.returncode != 0:
                rows[tool] = {
                    "description": TOOLS[tool],
                    "error": process.stderr.strip().splitlines()[-1][:300],
                }
                print(f"{tool}: FAILED {rows[tool]['error']}", file=sys.stderr)
                continue
            measured = json.loads(process.stdout.strip().splitlines()[-1])
            got = run_outputs(qcompiler.load(output), evaluation, "sentence_embedding")
            score = fidelity(reference, got)
            row = {
                "description": TOOLS[tool],
                **measured,
                "mean_cosine": round(score.mean_cosine, 4),
                "min_cosine": round(score.min_cosine, 4),
                "size_mb": round(output.stat().st_size / 2**20, 1),
                "1x128_ms": round(latency(output, 1), 2),
                "8x128_ms": round(latency(output, 8), 2),
                **integer_kernels(output),
            }
            row["speedup_8x128"] = round(fp32["8x128_ms"] / row["8x128_ms"], 2)
            rows[tool] = row
            print(tool, row, file=sys.stderr)
    result = {
        "model": "all-MiniLM-L6-v2",
        "calibration": "300 paragraphs, python-docs train slice",
        "evaluation": "600 paragraphs, python-docs test slice",
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
        "versions": versions(),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "minilm_w8a8.json").write_text(json.dumps(result, indent=2) + "\n")
    write_table(result, ROOT / "docs" / "benchmarks.md")


def write_table(result: dict, path: pathlib.Path) -> None:
    """Replace the MiniLM W8A8 section of docs/benchmarks.md with this run's table."""
    header = "| tool | mean / min cosine | compile s | peak RSS MB | size MB | 1x128 ms | 8x128 ms | speed-up 8x128 | int kernels / float weighted MatMuls |\n|---|---|---|---|---|---|---|---|---|\n"
    lines = []
    for name, row in result["rows"].items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'][:80]} | | | | | | | |")
        elif name == "fp32":
            lines.append(
                f"| FP32 | 1 / 1 | | | {row['size_mb']} | {row['1x128_ms']} | {row['8x128_ms']} | 1.00 | |"
            )
        else:
            lines.append(
                f"| {name} | {row['mean_cosine']:.4f} / {row['min_cosine']:.4f} | {row['seconds']} | {row['peak_rss_mb']:.0f} | {row['size_mb']} | "
                f"{row['1x128_ms']} | {row['8x128_ms']} | {row['speedup_8x128']:.2f} | {row['integer_kernels']} / {row['float_weighted_matmuls']} |"
            )
    legend = "\n".join(f"- `{name}`: {row['description']}" for name, row in result["rows"].items())
    section = (
        f"## MiniLM W8A8, ort-cpu\n\n{result['calibration']}; measured on {result['evaluation']}; {result['machine']}.\n"
        f"Generated by `python benchmarks/minilm_w8a8.py`.\n\n{header}" + "\n".join(lines) + f"\n\n{legend}\n"
    )
    text = (
        path.read_text()
        if path.exists()
        else "# Benchmarks\n\nAbsolute timings are noisy on shared machines: compare ratios within one run.\n\n"
    )
    start = text.find("## MiniLM W8A8, ort-cpu")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1 :] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


if __name__ == "__main__":
    main()
