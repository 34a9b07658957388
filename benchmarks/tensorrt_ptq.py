"""`--target tensorrt` on all-MiniLM-L6-v2 beside ModelOpt's ONNX PTQ, in one run.

Every tool gets the same 128 calibration paragraphs (python-docs train slice, padded to 128
tokens so ModelOpt can take them as one array per input) and every artifact is executed the
same way, on onnxruntime's CPU provider (basic graph optimizations, so Q/DQ run as written): mean
and min sentence-embedding cosine vs FP32 on 300 held-out paragraphs, file size, and which nodes
read a quantized input (the placement). Each tool compiles in its own process, so wall time and
peak RSS are its own; ModelOpt runs in a virtual environment of its own (``MODELOPT_PYTHON``,
default ``/work/venvs/modelopt/bin/python`` with ``pip install "nvidia-modelopt[onnx]"``), since
it brings onnxruntime-gpu.

    python benchmarks/tensorrt_ptq.py [--tools qcompiler-int8,modelopt-int8,...]

Writes ``results/tensorrt_ptq.json`` and the table in ``docs/benchmarks.md``.
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
    "qcompiler-int8": "qcompiler --target tensorrt --preset transformer: INT8 symmetric per-tensor activations, "
    "per-channel weights, SmoothQuant (alpha searched), MinMax; FP16 remainder",
    "qcompiler-fp8": "qcompiler --target tensorrt --preset transformer --activation-type fp8: FP8 E4M3 activations "
    "and weights (scales from FP8 ranges), SmoothQuant, MinMax; FP16 remainder",
    "modelopt-int8": "ModelOpt ONNX PTQ quantize_mode=int8, calibration_method=max, high_precision_dtype=fp16, CPU EP",
    "modelopt-int8-entropy": "ModelOpt ONNX PTQ quantize_mode=int8 with its default calibration (entropy), fp16, CPU EP",
    "modelopt-fp8": "ModelOpt ONNX PTQ quantize_mode=fp8, calibration_method=max, high_precision_dtype=fp16, CPU EP",
}
MODELOPT_PYTHON = os.environ.get("MODELOPT_PYTHON", "/work/venvs/modelopt/bin/python")


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
    """Run one tool; writes `output`."""
    with np.load(calibration / "padded.npz", allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    if tool.startswith("qcompiler"):
        import qcompiler
        from qcompiler.options import QuantType

        batches = [
            {name: array[i : i + 8] for name, array in arrays.items()}
            for i in range(0, len(arrays["input_ids"]), 8)
        ]
        activations = qcompiler.ActivationOptions(
            dtype=QuantType.FP8 if tool == "qcompiler-fp8" else QuantType.INT8
        )
        options = qcompiler.CompileOptions(
            preset=qcompiler.Preset.TRANSFORMER, activations=activations, count_fusion=False
        )
        qcompiler.compile(model, "tensorrt", options, data=batches, progress=False).save(output)
        return
    from modelopt.onnx.quantization import quantize

    mode = "fp8" if tool == "modelopt-fp8" else "int8"
    method = None if tool == "modelopt-int8-entropy" else "max"
    quantize(
        str(model),
        quantize_mode=mode,
        calibration_data=arrays,
        calibration_method=method,
        calibration_eps=["cpu"],
        high_precision_dtype="fp16",
        output_path=str(output),
    )


def worker(args: argparse.Namespace) -> None:
    """Child process: compile, then print wall time and own peak RSS as JSON."""
    peers.report_compile(lambda: compile_with(args.worker, args.model, args.calibration, args.output))


def placement(path: pathlib.Path) -> dict[str, int]:
    """Nodes reading a dequantized input, by op type, and the Q/DQ counts."""
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
    return {**readers, **counts}


def stored_types(path: pathlib.Path) -> dict[str, float]:
    """Share of initializer bytes per element type (shows FP weights kept behind a Q)."""
    import onnx_ir as ir

    model = ir.load(path)
    sizes: dict[str, int] = {}
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            name = value.const_value.dtype.name.lower()
            sizes[name] = sizes.get(name, 0) + value.const_value.nbytes
    total = sum(sizes.values()) or 1
    return {
        name: round(100 * size / total, 1) for name, size in sorted(sizes.items(), key=lambda item: -item[1])
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tools", default=",".join(TOOLS), help="comma-separated subset of " + ", ".join(TOOLS)
    )
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    args = peers.parse_or_work(parser, worker)
    if args is None:
        return

    import qcompiler
    from qcompiler.data import TextSource, input_specs
    from qcompiler.metrics import fidelity
    from qcompiler.models import CALIBRATION_TEXT, EVALUATION_TEXT, minilm
    from qcompiler.report import versions

    model_path = minilm.build()
    specs = input_specs(qcompiler.load(model_path))
    tokenizer = minilm.tokenizer_path()
    calibration = list(
        TextSource(CALIBRATION_TEXT, tokenizer, specs, seq_len=SEQ_LEN, samples=128, batch_size=8)
    )
    evaluation = list(TextSource(EVALUATION_TEXT, tokenizer, specs, samples=300, batch_size=16))
    reference = peers.Runner(model_path, "tensorrt").outputs(evaluation, "sentence_embedding")
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="qcompile-trt-bench-") as folder:
        work = pathlib.Path(folder)
        np.savez(work / "padded.npz", **padded(calibration))
        for tool in args.tools.split(","):
            output = work / f"{tool}.onnx"
            python = MODELOPT_PYTHON if tool.startswith("modelopt") else None
            timing = peers.compile_in_child(__file__, tool, model_path, work, output, python=python)
            row: dict = {"description": TOOLS[tool], **timing}
            if "error" not in timing:
                score = fidelity(
                    reference, peers.Runner(output, "tensorrt").outputs(evaluation, "sentence_embedding")
                )
                row.update(
                    mean_cosine=round(score.mean_cosine, 4),
                    min_cosine=round(score.min_cosine, 4),
                    size_mb=peers.artifact_mb(output),
                    placement=placement(output),
                    stored=stored_types(output),
                )
            rows[tool] = row
            print(tool, json.dumps(row))
    result = {
        "model": "all-MiniLM-L6-v2 (FP32 ONNX, 86.1 MB)",
        "calibration": f"128 paragraphs of python-docs-calib.txt padded to {SEQ_LEN} tokens",
        "evaluation": "300 paragraphs of python-docs-eval.txt, sentence-embedding cosine vs FP32, onnxruntime CPU",
        "versions": {**versions(), "nvidia-modelopt": "0.47.0 (own venv)"},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tensorrt_ptq.json").write_text(json.dumps(result, indent=2) + "\n")
    write_table(result)


def write_table(result: dict) -> None:
    """The MiniLM TensorRT section of docs/benchmarks.md."""
    table = [
        "| tool | mean / min cosine | size MB | compile s | peak RSS MB | Q / DQ | initializer bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        if "error" in row:
            table.append(f"| {name} | failed: {row['error']} | | | | | |")
            continue
        place = row["placement"]
        stored = ", ".join(f"{dtype} {share}%" for dtype, share in list(row["stored"].items())[:3])
        table.append(
            f"| {name} | {row['mean_cosine']:.4f} / {row['min_cosine']:.4f} | {row['size_mb']} | {row['seconds']} "
            f"| {row['peak_rss_mb']} | {place['QuantizeLinear']} / {place['DequantizeLinear']} | {stored} |"
        )
    intro = (
        f"`python benchmarks/tensorrt_ptq.py` (one run). {result['calibration']}; {result['evaluation']}. "
        "TensorRT itself cannot run here: every artifact is executed on onnxruntime's CPU provider."
    )
    rows = {name: {"description": row["description"]} for name, row in result["rows"].items()}
    peers.write_table_section("TensorRT W8A8 on all-MiniLM-L6-v2 (vs ModelOpt ONNX PTQ)", intro, table, rows)


if __name__ == "__main__":
    main()
