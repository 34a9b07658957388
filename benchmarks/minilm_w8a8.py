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
import sys
import tempfile
import time

import numpy as np
import peers

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOLS = {
    "qcompiler": "qcompiler transformer preset: SmoothQuant (alpha searched per group), MinMax, U8 act / S8 per-channel weights",
    "qcompiler-nosq": "qcompiler transformer preset without SmoothQuant",
    "qcompiler-ov": "qcompiler --target openvino-cpu, transformer preset (SmoothQuant, MinMax); runs in OpenVINO CPU",
    "qcompiler-ovir": "qcompiler --target openvino-cpu from the OpenVINO IR (.xml) of the FP32 model, transformer "
    "preset (SmoothQuant, MinMax); runs in OpenVINO CPU",
    "ort-all": "onnxruntime quantize_static QDQ S8S8 MinMax, all ops",
    "ort-matmul": "onnxruntime quantize_static QDQ U8S8 MinMax, MatMul only, per-channel",
    "nncf": "NNCF quantize (ONNX) model_type=TRANSFORMER (SmoothQuant on)",
    "nncf-nosq": "NNCF quantize (ONNX) model_type=TRANSFORMER, SmoothQuant off",
    "nncf-ov": "NNCF quantize (OpenVINO) model_type=TRANSFORMER (SmoothQuant on); runs in OpenVINO CPU",
}
OPENVINO_OUTPUT = ("qcompiler-ov", "qcompiler-ovir", "nncf-ov")
"""Tools whose artifact is OpenVINO IR (.xml), measured in OpenVINO CPU."""
IR_INPUT = ("qcompiler-ovir",)
"""Tools compiling the model's OpenVINO IR (fp32.xml, made once per run) instead of its ONNX."""
EMBEDDING = "sentence_embedding"
SHARED_TEST_SPLIT = ROOT.parent / "shared" / "data" / "python311-docs-en.test.txt"


def compile_with(
    tool: str, model_path: pathlib.Path, calibration: pathlib.Path, output: pathlib.Path
) -> None:
    """Run one tool; writes `output`."""
    import onnx
    from onnxruntime.quantization import QuantType

    feeds = peers.load_feeds(calibration)
    if tool in ("qcompiler", "qcompiler-nosq"):
        peers.qcompiler_w8a8(model_path, feeds, output, smooth_quant=tool == "qcompiler")
    elif tool in ("qcompiler-ov", "qcompiler-ovir"):
        peers.qcompiler_w8a8(model_path, feeds, output, smooth_quant=True, target="openvino-cpu")
    elif tool == "ort-all":
        peers.ort_quantize_static(
            model_path, feeds, output, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8
        )
    elif tool == "ort-matmul":
        peers.ort_quantize_static(
            model_path,
            feeds,
            output,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    elif tool == "nncf-ov":
        peers.nncf_openvino(model_path, feeds, output)
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
    peers.report_compile(lambda: compile_with(args.worker, args.model, args.calibration, args.output))


def latency_ms(runner: peers.Runner, batch: int, seq: int = 128, repeats: int = 20) -> float:
    """Median time of one MiniLM run on `batch` random sentences of `seq` tokens."""
    rng = np.random.default_rng(0)
    feed = {
        "input_ids": rng.integers(1000, 20000, (batch, seq)),
        "attention_mask": np.ones((batch, seq), np.int64),
        "token_type_ids": np.zeros((batch, seq), np.int64),
    }
    for _ in range(3):
        runner.run(feed, "sentence_embedding")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.run(feed, "sentence_embedding")
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def interleaved_latencies(
    artifacts: dict[str, pathlib.Path], rounds: int = 12
) -> dict[str, dict[str, float]]:
    """1x128 and 8x128 latency of every artifact, measured in turns: each round times every
    artifact once (median of 10 runs), every other round in reverse order, and the best round
    counts, so a slow spell of the machine hits all artifacts alike instead of whichever ran then
    (artifacts with the same runtime graph differ by up to 5 % over 5 rounds, under 1 % over 12)."""
    runners = {name: peers.Runner(path) for name, path in artifacts.items()}
    best: dict[str, dict[str, float]] = {name: {} for name in artifacts}
    for turn in range(rounds):
        order = list(runners.items())
        for name, runner in order if turn % 2 == 0 else order[::-1]:
            for batch in (1, 8):
                key = f"{batch}x128_ms"
                value = latency_ms(runner, batch, repeats=10)
                best[name][key] = round(min(best[name].get(key, value), value), 2)
    return best


def measure(path: pathlib.Path, evaluation, retrieval_feeds, reference, reference_retrieval) -> dict:
    """Fidelity, retrieval, latency and size of one artifact, in its runtime."""
    from qcompiler.metrics import fidelity, retrieval

    runner = peers.Runner(path)
    score = fidelity(reference, runner.outputs(evaluation, EMBEDDING))
    ranked = retrieval(
        runner.outputs(retrieval_feeds[0], EMBEDDING), runner.outputs(retrieval_feeds[1], EMBEDDING)
    )
    size = path.stat().st_size + (path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0)
    return {
        "mean_cosine": round(score.mean_cosine, 4),
        "min_cosine": round(score.min_cosine, 4),
        "recall_at_1": round(ranked.recall_at_1, 4),
        "mrr": round(ranked.mrr, 4),
        "recall_at_1_delta": round(ranked.recall_at_1 - reference_retrieval.recall_at_1, 4),
        "mrr_delta": round(ranked.mrr - reference_retrieval.mrr, 4),
        "size_mb": round(size / 2**20, 1),
        "runtime": "openvino" if path.suffix == ".xml" else "onnxruntime",
    }


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
    parser.add_argument("--reuse", action="store_true", help="keep earlier rows of tools not run now")
    args = peers.parse_or_work(parser, worker)
    if args is None:
        return

    import openvino as ov

    import qcompiler
    from qcompiler.data import TextSource, input_specs, read_text_lines
    from qcompiler.metrics import query_document_pairs, retrieval
    from qcompiler.models import CALIBRATION_TEXT, EVALUATION_TEXT, minilm
    from qcompiler.report import versions

    model_path = minilm.build()
    specs = input_specs(qcompiler.load(model_path))
    tokenizer = minilm.tokenizer_path()
    evaluation = list(TextSource(EVALUATION_TEXT, tokenizer, specs, samples=600, batch_size=16))
    retrieval_source = SHARED_TEST_SPLIT if SHARED_TEST_SPLIT.exists() else EVALUATION_TEXT
    pairs = query_document_pairs(
        [line for line in read_text_lines(retrieval_source) if len(line.split()) >= 8]
    )
    retrieval_feeds = tuple(
        list(
            TextSource(
                [pair[i] for pair in pairs], tokenizer, specs, seq_len=256, samples=None, batch_size=16
            )
        )
        for i in (0, 1)
    )
    reference_runner = peers.Runner(model_path)
    reference = reference_runner.outputs(evaluation, EMBEDDING)
    reference_retrieval = retrieval(
        reference_runner.outputs(retrieval_feeds[0], EMBEDDING),
        reference_runner.outputs(retrieval_feeds[1], EMBEDDING),
    )
    with tempfile.TemporaryDirectory(prefix="qcompile-bench-") as folder:
        work = pathlib.Path(folder)
        fp32_ov = work / "fp32.xml"
        ov.save_model(ov.convert_model(str(model_path)), str(fp32_ov), compress_to_fp16=False)
        rows = {}
        results_path = args.out / "minilm_w8a8.json"
        tools = args.tools.split(",")
        if args.reuse and results_path.exists():
            earlier = json.loads(results_path.read_text())["rows"]
            rows = {name: row for name, row in earlier.items() if name not in tools}
        artifacts = {"fp32": model_path, "fp32-ov": fp32_ov}
        for name, path in artifacts.items():
            rows[name] = {
                "description": f"FP32 reference in {'OpenVINO' if name == 'fp32-ov' else 'onnxruntime'}",
                **measure(path, evaluation, retrieval_feeds, reference, reference_retrieval),
            }
        calibration = work / "calibration"
        peers.save_feeds(
            TextSource(CALIBRATION_TEXT, tokenizer, specs, samples=300, batch_size=1), calibration
        )
        for tool in tools:
            output = work / (f"{tool}.xml" if tool in OPENVINO_OUTPUT else f"{tool}.onnx")
            model = fp32_ov if tool in IR_INPUT else model_path
            measured = peers.compile_in_child(__file__, tool, model, calibration, output)
            if "error" in measured:
                rows[tool] = {"description": TOOLS[tool], **measured}
                print(f"{tool}: FAILED {rows[tool]['error']}", file=sys.stderr)
                continue
            row = {
                "description": TOOLS[tool],
                **measured,
                **measure(output, evaluation, retrieval_feeds, reference, reference_retrieval),
            }
            if output.suffix == ".onnx":
                row.update(integer_kernels(output))
            rows[tool] = row
            artifacts[tool] = output
            print(tool, row, file=sys.stderr)
        for name, latencies in interleaved_latencies(artifacts).items():
            rows[name].update(latencies)
        for name in artifacts:
            if name.startswith("fp32"):
                continue
            baseline = rows["fp32-ov" if artifacts[name].suffix == ".xml" else "fp32"]
            rows[name]["speedup_8x128"] = round(baseline["8x128_ms"] / rows[name]["8x128_ms"], 2)
    result = {
        "model": "all-MiniLM-L6-v2",
        "calibration": "300 paragraphs, python-docs train slice (one per feed)",
        "evaluation": "cosine on 600 paragraphs of the python-docs test slice; retrieval on "
        f"{len(pairs)} first-sentence -> rest pairs of {retrieval_source.name}",
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
        "versions": {**versions(), "nncf": _version("nncf"), "openvino": _version("openvino")},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "minilm_w8a8.json").write_text(json.dumps(result, indent=2) + "\n")
    write_table(result, ROOT / "docs" / "benchmarks.md")


def _version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def write_table(result: dict, path: pathlib.Path) -> None:
    """Replace the MiniLM W8A8 section of docs/benchmarks.md with this run's table."""
    header = (
        "| tool | runtime | mean / min cosine | R@1 (delta) | MRR (delta) | compile s | peak RSS MB | size MB "
        "| 1x128 ms | 8x128 ms | speed-up 8x128 | int kernels / float weighted MatMuls |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, row in result["rows"].items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'][:80]} |" + " |" * 10)
            continue
        kernels = (
            f"{row['integer_kernels']} / {row['float_weighted_matmuls']}" if "integer_kernels" in row else ""
        )
        lines.append(
            f"| {name} | {row['runtime']} | {row['mean_cosine']:.4f} / {row['min_cosine']:.4f} "
            f"| {row['recall_at_1']:.3f} ({row['recall_at_1_delta']:+.3f}) | {row['mrr']:.3f} ({row['mrr_delta']:+.3f}) "
            f"| {row.get('seconds', '')} | {row.get('peak_rss_mb', '')} | {row['size_mb']} | {row['1x128_ms']} "
            f"| {row['8x128_ms']} | {row.get('speedup_8x128', 1.0):.2f} | {kernels} |"
        )
    legend = "\n".join(f"- `{name}`: {row['description']}" for name, row in result["rows"].items())
    section = (
        f"## MiniLM W8A8\n\nCalibration: {result['calibration']}. Evaluation: {result['evaluation']}. "
        f"{result['machine']}. Speed-up is against FP32 in the same runtime. Latencies of the artifacts made in one "
        "run are measured in turns (12 rounds, alternating order, each the median of 10 runs; the best round counts).\n"
        f"Generated by `python benchmarks/minilm_w8a8.py`; raw numbers in `benchmarks/results/minilm_w8a8.json`.\n\n"
        f"{header}" + "\n".join(lines) + f"\n\n{legend}\n"
    )
    peers.replace_section(path, "MiniLM W8A8", section)


if __name__ == "__main__":
    main()
