"""`--target tensorrt` on all-MiniLM-L6-v2 and PP-OCRv5 det / rec / cls beside ModelOpt's ONNX PTQ, in one run.

Every tool gets the same calibration data (MiniLM: 128 python-docs paragraphs padded to 128
tokens, so ModelOpt can take them as one array per input; PP-OCRv5: 64 rendered images per
model) and every artifact is executed the same way, on onnxruntime's CPU provider with graph
optimizations off, so Q/DQ run as written (`backends/tensorrt/verification.py`): MiniLM's mean
and min sentence-embedding cosine vs FP32 on 300 held-out paragraphs; PP-OCRv5's task metric as
`cnn_w8a8.py` measures it (det F1 on 50 pages, rec exact lines and CER, cls accuracy on 500
lines); file size; and which nodes read a quantized input (the placement). Each tool compiles in
its own process, so wall time and peak RSS are its own; ModelOpt runs in a virtual environment
of its own (``MODELOPT_PYTHON``, default ``/work/venvs/modelopt/bin/python`` with
``pip install "nvidia-modelopt[onnx]"``), since it brings onnxruntime-gpu.

    python benchmarks/tensorrt_ptq.py [--models minilm,rec,cls,det] [--tools qcompiler-int8,...]

Writes ``results/tensorrt_ptq.json`` and the tables in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile

import numpy as np
import peers

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEQ_LEN = 128
TOOLS = {
    "qcompiler-int8": "qcompiler --target tensorrt: INT8 symmetric per-tensor activations, per-channel weights; "
    "MiniLM: transformer preset (SmoothQuant, MinMax), CNNs: default preset (percentile ranges, bias correction); "
    "FP16 remainder",
    "qcompiler-fp8": "qcompiler --target tensorrt --activation-type fp8: FP8 E4M3 activations and weights (scales "
    "from FP8 ranges, MinMax); presets as for INT8; FP16 remainder",
    "modelopt-int8": "ModelOpt ONNX PTQ quantize_mode=int8, calibration_method=max, high_precision_dtype=fp16, CPU EP",
    "modelopt-int8-entropy": "ModelOpt ONNX PTQ quantize_mode=int8 with its default calibration (entropy), fp16, CPU EP",
    "modelopt-fp8": "ModelOpt ONNX PTQ quantize_mode=fp8, calibration_method=max, high_precision_dtype=fp16, CPU EP",
}
MODELOPT_PYTHON = os.environ.get("MODELOPT_PYTHON", "/work/venvs/modelopt/bin/python")
TITLES = {
    "minilm": "all-MiniLM-L6-v2",
    "rec": "PP-OCRv5 rec",
    "cls": "PP-OCRv5 cls",
    "det": "PP-OCRv5 det",
}


def padded(feeds) -> dict[str, np.ndarray]:
    """The feeds as one array per input, every row padded with zeros to `SEQ_LEN` tokens."""
    arrays: dict[str, list[np.ndarray]] = {}
    for feed in feeds:
        for name, array in feed.items():
            rows = np.zeros((array.shape[0], SEQ_LEN), array.dtype)
            rows[:, : array.shape[1]] = array[:, :SEQ_LEN]
            arrays.setdefault(name, []).append(rows)
    return {name: np.concatenate(parts) for name, parts in arrays.items()}


def compile_with(tool: str, model: pathlib.Path, calibration: pathlib.Path, output: pathlib.Path) -> None:
    """Run one tool; writes `output` (`calibration`: a folder holding ``<model stem>.npz``)."""
    with np.load(calibration / f"{model.stem}.npz", allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    transformer = "input_ids" in arrays
    if tool.startswith("qcompiler"):
        import qcompiler
        from qcompiler.options import QuantType

        rows = len(next(iter(arrays.values())))
        batch = 8 if transformer else 1
        batches = [
            {name: array[i : i + batch] for name, array in arrays.items()} for i in range(0, rows, batch)
        ]
        activations = qcompiler.ActivationOptions(
            dtype=QuantType.FP8 if tool == "qcompiler-fp8" else QuantType.INT8
        )
        preset = qcompiler.Preset.TRANSFORMER if transformer else qcompiler.Preset.DEFAULT
        options = qcompiler.CompileOptions(preset=preset, activations=activations, count_fusion=False)
        qcompiler.compile(model, "tensorrt", options, data=batches, progress=False).save(output)
        return
    from modelopt.onnx.quantization import quantize

    quantize(
        str(model),
        quantize_mode="fp8" if tool == "modelopt-fp8" else "int8",
        calibration_data=arrays,
        calibration_method=None if tool == "modelopt-int8-entropy" else "max",
        calibration_eps=["cpu"],
        high_precision_dtype="fp16",
        output_path=str(output),
    )


def worker(args: argparse.Namespace) -> None:
    """Child process: compile, then print wall time and own peak RSS as JSON."""
    peers.report_compile(lambda: compile_with(args.worker, args.model, args.calibration, args.output))


def minilm_task():
    """MiniLM: the model, its padded calibration arrays, and the cosine score of a runner."""
    import qcompiler
    from qcompiler.data import TextSource, input_specs
    from qcompiler.metrics import fidelity
    from qcompiler.models import CALIBRATION_TEXT, EVALUATION_TEXT, minilm

    model_path = minilm.build()
    specs = input_specs(qcompiler.load(model_path))
    tokenizer = minilm.tokenizer_path()
    calibration = list(
        TextSource(CALIBRATION_TEXT, tokenizer, specs, seq_len=SEQ_LEN, samples=128, batch_size=8)
    )
    evaluation = list(TextSource(EVALUATION_TEXT, tokenizer, specs, samples=300, batch_size=16))
    reference = peers.Runner(model_path, "tensorrt").outputs(evaluation, "sentence_embedding")

    def score(runner: peers.Runner) -> dict[str, float]:
        found = fidelity(reference, runner.outputs(evaluation, "sentence_embedding"))
        return {"mean_cosine": round(found.mean_cosine, 4), "min_cosine": round(found.min_cosine, 4)}

    description = f"128 python-docs-calib paragraphs padded to {SEQ_LEN} tokens; cosine vs FP32 on 300 python-docs-eval paragraphs"
    return model_path, {"calibration": padded(calibration), "description": description}, score


def ppocr_task(kind: str):
    """A PP-OCRv5 model: its path, 64 calibration images, and `cnn_w8a8.Task`'s metric."""
    import cnn_w8a8

    task = cnn_w8a8.Task(kind, 500, 50, 64)
    data = {"calibration": {"x": np.asarray(task.calibration)}, "description": task.size}
    return task.ppocr.model_path(kind), data, task.score


def describe(path: pathlib.Path) -> dict[str, dict]:
    """What an artifact holds, read once: nodes reading a dequantized input by op type with the Q/DQ
    counts (the placement), and the share of initializer bytes per element type (FP weights kept
    behind a Q show as float16)."""
    import onnx_ir as ir

    model = ir.load(path)
    readers: dict[str, int] = {}
    for node in model.graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if any(
            v is not None and v.producer() is not None and v.producer().op_type == "DequantizeLinear"
            for v in node.inputs
        ):
            readers[node.op_type] = readers.get(node.op_type, 0) + 1
    counts = {
        op: sum(node.op_type == op for node in model.graph) for op in ("QuantizeLinear", "DequantizeLinear")
    }
    sizes: dict[str, int] = {}
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            name = value.const_value.dtype.name.lower()
            sizes[name] = sizes.get(name, 0) + value.const_value.nbytes
    total = sum(sizes.values()) or 1
    stored = {
        name: round(100 * size / total, 1) for name, size in sorted(sizes.items(), key=lambda item: -item[1])
    }
    return {"placement": {**readers, **counts}, "stored": stored}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tools", default=",".join(TOOLS), help="comma-separated subset of " + ", ".join(TOOLS)
    )
    parser.add_argument(
        "--models", default=",".join(TITLES), help="comma-separated subset of " + ", ".join(TITLES)
    )
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    args = peers.parse_or_work(parser, worker)
    if args is None:
        return
    from qcompiler.report import versions

    tools = args.tools.split(",")
    result: dict = {"versions": {**versions(), "nvidia-modelopt": "0.47.0 (own venv)"}, "models": {}}
    with tempfile.TemporaryDirectory(prefix="qcompile-trt-bench-") as folder:
        work = pathlib.Path(folder)
        for name in args.models.split(","):
            model_path, data, score = minilm_task() if name == "minilm" else ppocr_task(name)
            np.savez(work / f"{model_path.stem}.npz", **data["calibration"])
            rows: dict[str, dict] = {
                "fp32": {"description": "FP32 input", **score(peers.Runner(model_path, "tensorrt"))}
            }
            for tool in tools:
                output = work / f"{name}-{tool}.onnx"
                python = MODELOPT_PYTHON if tool.startswith("modelopt") else None
                timing = peers.compile_in_child(__file__, tool, model_path, work, output, python=python)
                row: dict = {"description": TOOLS[tool], **timing}
                if "error" not in timing:
                    row.update(score(peers.Runner(output, "tensorrt")))
                    row.update(size_mb=peers.artifact_mb(output), **describe(output))
                rows[tool] = row
                print(name, tool, json.dumps(row), flush=True)
            result["models"][name] = {"data": data["description"], "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tensorrt_ptq.json").write_text(json.dumps(result, indent=2) + "\n")
    write_table(result)


METRICS = {
    "minilm": ("mean / min cosine", lambda row: f"{row['mean_cosine']:.4f} / {row['min_cosine']:.4f}"),
    "rec": ("exact lines / CER", lambda row: f"{100 * row['accuracy']:.1f} % / {100 * row['cer']:.2f} %"),
    "cls": ("accuracy", lambda row: f"{100 * row['accuracy']:.1f} %"),
    "det": ("F1", lambda row: f"{100 * row['f1']:.1f} %"),
}


def write_table(result: dict) -> None:
    """The TensorRT section of docs/benchmarks.md: one table per model."""
    parts = [
        "`python benchmarks/tensorrt_ptq.py` (one run). TensorRT itself cannot run here: every artifact is "
        "executed on onnxruntime's CPU provider, graph optimizations off. Q / DQ: the artifact's node counts; "
        "initializer bytes: the largest shares by element type (FP weights kept behind a Q show as float16).\n"
    ]
    descriptions: dict[str, dict] = {}
    for name, model in result["models"].items():
        label, metric = METRICS[name]
        table = [
            f"| tool | {label} | size MB | compile s | peak RSS MB | Q / DQ | initializer bytes |",
            "|---|---|---|---|---|---|---|",
        ]
        for tool, row in model["rows"].items():
            descriptions[tool] = {"description": row["description"]}
            if tool == "fp32":
                table.append(f"| FP32 input | {metric(row)} | | | | | |")
            elif "error" in row:
                table.append(f"| {tool} | failed: {row['error']} | | | | | |")
            else:
                place = row["placement"]
                stored = ", ".join(f"{dtype} {share}%" for dtype, share in list(row["stored"].items())[:2])
                table.append(
                    f"| {tool} | {metric(row)} | {row['size_mb']} | {row['seconds']} | {row['peak_rss_mb']} "
                    f"| {place['QuantizeLinear']} / {place['DequantizeLinear']} | {stored} |"
                )
        parts.append(f"**{TITLES[name]}** ({model['data']}):\n\n" + "\n".join(table) + "\n")
    descriptions.pop("fp32", None)
    peers.write_table_section("TensorRT W8A8 (vs ModelOpt ONNX PTQ)", "\n".join(parts), [], descriptions)


if __name__ == "__main__":
    main()
