"""`--max-drop` and `--effective-bits` beside NNCF's accuracy control, in one run.

    python benchmarks/accuracy_control.py minilm   [--tools qcompiler,qcompiler-nofallback,nncf-aac]
    python benchmarks/accuracy_control.py smollm2  [--tools int4-g64,maxdrop,bits5,uniform-g32]

MiniLM: a deliberately harmful W8A8 configuration (MatMul, Add and Softmax all quantized, no
SmoothQuant) with ``--max-drop 0.01`` on mean sentence-embedding cosine vs FP32, validated on 128
paragraphs of the python-docs valid slice and checked on 600 held-out test paragraphs; NNCF's
``quantize_with_accuracy_control`` (OpenVINO backend) gets the same metric, budget and data.
SmolLM2: INT4 sym g64 AWQ + scale estimation with ``--max-drop 0.05`` relative perplexity
(16 validation windows of 512 tokens, at most 20 trials), and ``--effective-bits 5`` against a uniform assignment of the same size
(INT4 g32 everywhere = 5 bits per weight with float32 scales); perplexity on every 512-token window of
the test slice, with each artifact's drop from FP32 and its 95 % paired bootstrap interval over those windows.
Each tool compiles in its own subprocess (wall time and peak RSS are its own). Writes
``results/accuracy_control_<model>.json`` and a section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import peers

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMBEDDING = "sentence_embedding"
HARMFUL_OPS = ("MatMul", "Add", "Softmax")
TOOLS = {
    "minilm": {
        "qcompiler-nofallback": "qcompiler W8A8 on MatMul+Add+Softmax, no SmoothQuant (the harmful start)",
        "qcompiler": "the same with --max-drop 0.01 (absolute mean cosine)",
        "qcompiler-ov": "the same for --target openvino-cpu: every candidate measured in OpenVINO CPU",
        "nncf-aac": "NNCF quantize_with_accuracy_control (OpenVINO), max_drop 0.01 absolute, same metric",
    },
    "smollm2": {
        "int4-g64": "qcompiler INT4 sym g64 AWQ+SE, embeddings/head INT8 (NNCF policy)",
        "maxdrop": "the same with --max-drop 0.05 relative perplexity",
        "maxdrop-margin": "the same with --drop-margin 0.01 (the search holds the drop to 0.04)",
        "bits5": "INT4 sym g64 AWQ+SE, --effective-bits 5 (formats by integer program)",
        "uniform-g32": "INT4 sym g32 AWQ+SE on every weight incl. embeddings/head (5 bits/weight uniform)",
    },
}


def _data(model_name: str, model_path: pathlib.Path):
    """(calibration, validation, test) feeds."""
    import qcompiler
    from qcompiler.data import TextSource, TokenWindows, input_specs
    from qcompiler.models import CALIBRATION_TEXT, EVALUATION_TEXT, VALIDATION_TEXT, minilm, smollm2

    specs = input_specs(qcompiler.load(model_path))
    if model_name == "minilm":
        tokenizer = minilm.tokenizer_path()
        return (
            list(TextSource(CALIBRATION_TEXT, tokenizer, specs, samples=300)),
            list(TextSource(VALIDATION_TEXT, tokenizer, specs, samples=128, batch_size=16)),
            list(TextSource(EVALUATION_TEXT, tokenizer, specs, samples=600, batch_size=16)),
        )
    tokenizer = smollm2.tokenizer_path()
    return (
        list(TokenWindows(CALIBRATION_TEXT, tokenizer, specs, seq_len=512, windows=28)),
        list(TokenWindows(VALIDATION_TEXT, tokenizer, specs, seq_len=512, windows=VALIDATION_WINDOWS)),
        list(TokenWindows(EVALUATION_TEXT, tokenizer, specs, seq_len=512)),  # every test window
    )


VALIDATION_WINDOWS = 16
"""512-token windows of the valid slice the --max-drop search measures on (8192 tokens)."""


def paired_interval(nll: np.ndarray, float_nll: np.ndarray, resamples: int = 1000) -> list[float]:
    """95 % paired bootstrap interval of the relative perplexity drop over test windows."""
    picks = np.random.default_rng(0).integers(0, len(nll), size=(resamples, len(nll)))
    drops = np.exp((nll[picks].sum(axis=1) - float_nll[picks].sum(axis=1)) / (picks.shape[1] * 511)) - 1
    return [round(float(q), 4) for q in np.quantile(drops, [0.025, 0.975])]


def compile_with(tool: str, model: pathlib.Path, calibration, validation, output: pathlib.Path) -> dict:
    """Run one tool; writes `output`; returns what the tool reports about its search."""
    import qcompiler

    if tool == "nncf-aac":
        return _nncf_accuracy_control(model, calibration, validation, output)
    if tool.startswith("qcompiler"):
        options = qcompiler.CompileOptions(
            op_types=HARMFUL_OPS,
            smooth_quant=qcompiler.SmoothQuantOptions(enabled=False),
            count_fusion=False,
            accuracy=qcompiler.AccuracyOptions(
                max_drop=None if tool == "qcompiler-nofallback" else 0.01,
                metric="cosine",
                metric_output=EMBEDDING,
            ),
        )
    else:
        compression = qcompiler.CompressionOptions(
            format=qcompiler.WeightFormat.INT4,
            group_size=32 if tool == "uniform-g32" else 64,
            symmetric=True,
            awq=True,
            scale_estimation=True,
            backup_layers=tool != "uniform-g32",
        )
        accuracy = qcompiler.AccuracyOptions(
            max_drop=0.05 if tool.startswith("maxdrop") else None,
            drop_margin=0.01 if tool == "maxdrop-margin" else 0.0,
            drop_type=qcompiler.DropType.RELATIVE,
            metric="perplexity",
            effective_bits=5.0 if tool == "bits5" else None,
            max_trials=20,
        )
        options = qcompiler.CompileOptions(compression=compression, accuracy=accuracy)
    target = "openvino-cpu" if tool.endswith("-ov") else "ort-cpu"
    result = qcompiler.compile(
        model, target, options, data=calibration, validation=validation, progress=False
    )
    peers.save_result(result, output)
    info: dict[str, object] = {"timings_s": result.report.timings_s}
    if result.report.fallback:
        fallback = result.report.fallback
        groups = fallback["groups"]  # type: ignore[index]
        info["fallback"] = {
            key: fallback.get(key)
            for key in (
                "metric",
                "float_score",
                "score",
                "drop",
                "drop_interval",
                "met",
                "met_within_noise",
                "validation",
                "stopped_by",
                "seconds",
            )
        }
        info["fallback"]["trials"] = len(fallback["trials"])  # type: ignore[arg-type,index]
        info["fallback"]["evaluations"] = fallback["evaluations"]  # type: ignore[index]
        info["moved"] = {name: g["format"] for name, g in groups.items() if g["format"] != g["ladder"][0]}  # type: ignore[union-attr]
        info["groups"] = len(groups)  # type: ignore[arg-type]
    if result.report.mixed_precision:
        info["mixed_precision"] = result.report.mixed_precision
    info["quantized_nodes"] = result.report.nodes.get("quantized", result.report.nodes.get("compressed"))
    return info


def _nncf_accuracy_control(model: pathlib.Path, calibration, validation, output: pathlib.Path) -> dict:
    import nncf
    import openvino as ov

    reference = peers.Runner(model).outputs(validation, EMBEDDING)
    evaluations = []

    def validate(compiled, feeds) -> float:
        port = compiled.output(EMBEDDING)
        got = np.concatenate([compiled(feed)[port] for feed in feeds])
        from qcompiler.metrics import row_cosine

        evaluations.append(1)
        return float(np.mean(row_cosine(reference, got)))

    quantized = nncf.quantize_with_accuracy_control(
        ov.convert_model(str(model)),
        nncf.Dataset(calibration),
        nncf.Dataset(validation),
        validation_fn=validate,
        max_drop=0.01,
        drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(calibration),
    )
    ov.save_model(quantized, str(output), compress_to_fp16=False)
    return {"evaluations": len(evaluations)}


def worker(args: argparse.Namespace) -> None:
    """Child process: compile one tool, print wall time, peak RSS and the tool's info as JSON."""
    calibration = peers.load_feeds(args.calibration)
    validation = peers.load_feeds(args.calibration.parent / "validation")
    start = time.perf_counter()
    info = compile_with(args.worker, args.model, calibration, validation, args.output)
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"compile_s": round(wall, 1), "peak_rss_mb": round(rss), **info}))


def measure(model_name: str, path: pathlib.Path, test, reference: np.ndarray | None) -> dict:
    """Held-out metric of an artifact, and its size."""
    from qcompiler.metrics import row_cosine

    runner = peers.Runner(path)
    companions = [path, path.with_suffix(".bin"), path.with_name(path.name + ".data")]
    size = sum(p.stat().st_size for p in companions if p.exists())
    if model_name == "minilm":
        cosines = row_cosine(reference, runner.outputs(test, EMBEDDING))
        return {
            "test_mean_cosine": float(cosines.mean()),
            "test_min_cosine": float(cosines.min()),
            "size_mb": size / 1e6,
        }
    from qcompiler.metrics import next_token_nll

    nll = [next_token_nll(runner.run(feed, "logits"), feed["input_ids"]) for feed in test]
    tokens = sum(count for _, count in nll)
    perplexity = float(np.exp(sum(total for total, _ in nll) / tokens))
    return {
        "test_perplexity": perplexity,
        "tokens": tokens,
        "windows": len(test),
        "window_nll": [round(total, 4) for total, _ in nll],
        "size_mb": size / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_name", choices=sorted(TOOLS))
    parser.add_argument("--tools", help="comma-separated subset of the model's tools")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--reuse", action="store_true", help="keep earlier rows of tools not run now")
    args = peers.parse_or_work(parser, worker)
    if args is None:
        return
    from qcompiler.models import minilm, smollm2
    from qcompiler.report import versions

    module = minilm if args.model_name == "minilm" else smollm2
    model_path = module.build()
    calibration, validation, test = _data(args.model_name, model_path)
    tools = args.tools.split(",") if args.tools else list(TOOLS[args.model_name])
    reference = peers.Runner(model_path).outputs(test, EMBEDDING) if args.model_name == "minilm" else None
    results_path = args.out / f"accuracy_control_{args.model_name}.json"
    rows: dict[str, dict] = {}
    if args.reuse and results_path.exists():
        rows = {
            k: v
            for k, v in json.loads(results_path.read_text())["rows"].items()
            if k not in tools and k != "fp32"
        }
        for row in rows.values():
            row["reused"] = True  # measured by an earlier run of this script
    rows = {"fp32": measure(args.model_name, model_path, test, reference), **rows}
    print("fp32", rows["fp32"], file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="qcompile-bench-") as folder:
        work = pathlib.Path(folder)
        peers.save_feeds(calibration, work / "calibration")
        peers.save_feeds(validation, work / "validation")
        for tool in tools:
            openvino = tool.startswith("nncf") or tool.endswith("-ov")
            output = work / (f"{tool}.xml" if openvino else f"{tool}.onnx")
            command = [
                sys.executable,
                __file__,
                args.model_name,
                "--worker",
                tool,
                "--model",
                str(model_path),
            ]
            command += ["--calibration", str(work / "calibration"), "--output", str(output)]
            process = subprocess.run(command, capture_output=True, text=True, check=False)
            if process.returncode != 0:
                rows[tool] = {"error": process.stderr.strip().splitlines()[-1][:300]}
            else:
                rows[tool] = {
                    **json.loads(process.stdout.strip().splitlines()[-1]),
                    **measure(args.model_name, output, test, reference),
                }
            rows[tool]["description"] = TOOLS[args.model_name][tool]
            if "window_nll" in rows[tool]:  # the drop on test windows the search never saw
                nll, float_nll = np.array(rows[tool]["window_nll"]), np.array(rows["fp32"]["window_nll"])
                rows[tool]["test_drop"] = round(
                    rows[tool]["test_perplexity"] / rows["fp32"]["test_perplexity"] - 1, 4
                )
                rows[tool]["test_drop_interval"] = paired_interval(nll, float_nll)
            print(tool, json.dumps(rows[tool])[:1500], file=sys.stderr, flush=True)
    result = {
        "model": args.model_name,
        "versions": {
            **versions(),
            "nncf": peers.version_of("nncf"),
            "openvino": peers.version_of("openvino"),
        },
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(result, indent=2) + "\n")
    write_table(result, ROOT / "docs" / "benchmarks.md")


def write_table(result: dict, path: pathlib.Path) -> None:
    """Replace this model's accuracy-control section of docs/benchmarks.md."""
    minilm = result["model"] == "minilm"
    metric = "test mean / min cosine" if minilm else "test perplexity"
    lines = [
        f"## Accuracy control: {result['model']}",
        "",
        "`python benchmarks/accuracy_control.py "
        + result["model"]
        + '` (see the script\'s docstring; rows marked "earlier run" come from the previous run of the same script on this machine, kept with --reuse).',
        "",
        f"| tool | {metric} | size MB | compile s | peak RSS MB | search |",
        "|---|---|---|---|---|---|",
    ]
    for tool, row in result["rows"].items():
        if "error" in row:
            lines.append(f"| {tool} | error: {row['error']} | | | | |")
            continue
        value = (
            f"{row['test_mean_cosine']:.4f} / {row['test_min_cosine']:.4f}"
            if minilm
            else f"{row['test_perplexity']:.3f}"
        )
        search = ""
        if "test_drop" in row:
            low, high = row["test_drop_interval"]
            value += f" ({row['test_drop']:+.2%}, {low:+.2%} .. {high:+.2%} over {row['windows']} windows)"
        if "fallback" in row:
            fb = row["fallback"]
            search = (
                f"val {fb['metric']} drop {fb['drop']:.4f} ({'met' if fb['met'] else 'not met'}"
                f"{' within noise' if fb.get('met_within_noise') else ''}), "
                f"{fb['trials']} trials / {fb['evaluations']} evaluations, {len(row['moved'])} of {row['groups']} groups moved"
            )
            if fb.get("drop_interval"):
                validation = fb["validation"]
                search += (
                    f"; 95 % interval {fb['drop_interval'][0]:.4f} .. {fb['drop_interval'][1]:.4f} on "
                    f"{validation['batches']} windows of {validation.get('context_tokens')} tokens"
                )
        elif "mixed_precision" in row:
            mp = row["mixed_precision"]
            search = f"{mp['achieved_effective_bits']} bits/weight, {mp['groups_by_rung']}"
        elif "evaluations" in row:
            search = f"{row['evaluations']} validation runs"
        tool = f"{tool} (earlier run)" if row.get("reused") else tool
        lines.append(
            f"| {tool} | {value} | {row.get('size_mb', 0):.1f} | {row.get('compile_s', '')} | "
            f"{row.get('peak_rss_mb', '')} | {search} |"
        )
    lines.append("")
    peers.replace_section(path, f"Accuracy control: {result['model']}", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
