"""Weight-only INT4 on SmolLM2-135M and MiniLM: qcompiler's ablation beside NNCF compress_weights
and onnxruntime's MatMulNBitsQuantizer, in one run.

Every tool gets the same calibration feeds and is measured the same way in this process:
SmolLM2 perplexity on non-overlapping 512-token windows of the python-docs test split, MiniLM
sentence-embedding cosine vs FP32 on 600 test paragraphs. Each tool compiles in its own
subprocess (wall time, peak RSS from VmHWM). NNCF runs on its OpenVINO backend and is measured
in OpenVINO CPU (f32 inference); everything else in onnxruntime CPU, 2 threads.

    python benchmarks/weight_compression.py smollm2 [--tools ...] [--windows 32]
    python benchmarks/weight_compression.py minilm [--tools ...]

Writes ``results/weight_compression_<model>.json`` and a table in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import peers

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_TEST_SPLIT = ROOT.parent / "shared" / "data" / "python311-docs-en.test.txt"

# qcompiler tool -> algorithm flags; "-int8" tools compress to INT8 per channel instead
QCOMPILER_TOOLS = {
    "qc-int8": (),
    "qc-rtn": (),
    "qc-hqq": ("hqq",),
    "qc-awq": ("awq",),
    "qc-se": ("scale_estimation",),
    "qc-gptq": ("gptq",),
    "qc-awq-se": ("awq", "scale_estimation"),
    "qc-se-gptq": ("scale_estimation", "gptq"),
    "qc-awq-se-gptq": ("awq", "scale_estimation", "gptq"),
    "qc-nf4-awq-se": ("awq", "scale_estimation"),
    "qc-mxfp4-awq-se": ("awq", "scale_estimation"),
    "qc-nvfp4-awq-se": ("awq", "scale_estimation"),
    "qc-ov-awq-se": ("awq", "scale_estimation"),
    "qc-ov-se-gptq": ("scale_estimation", "gptq"),
    "qc-ovir-awq-se": ("awq", "scale_estimation"),
}
OPENVINO_TOOLS = ("qc-ov-awq-se", "qc-ov-se-gptq", "qc-ovir-awq-se")
"""qcompiler tools compiled for --target openvino-cpu (an .xml artifact measured in OpenVINO CPU)."""
IR_INPUT_TOOLS = ("qc-ovir-awq-se",)
"""qcompiler tools whose input is the model's OpenVINO IR (made once per run, not timed), not its ONNX."""
FP4 = ("mxfp4", "nvfp4")
"""Formats onnxruntime runs through our packed-FP4 MatMul (an onnxruntime-extensions Python op)."""
PEERS = {
    "nncf-int8": "NNCF compress_weights (OpenVINO) INT8_ASYM per channel, data-free",
    "nncf-rtn": "NNCF compress_weights (OpenVINO), data-free",
    "nncf-awq-se": "NNCF compress_weights (OpenVINO), awq=True, scale_estimation=True",
    "nncf-se": "NNCF compress_weights (OpenVINO), scale_estimation=True",
    "nncf-gptq": "NNCF compress_weights (OpenVINO), gptq=True",
    "nncf-onnx-rtn": "NNCF compress_weights (ONNX backend), data-free",
    "nncf-onnx-awq-se": "NNCF compress_weights (ONNX backend), awq=True, scale_estimation=True",
    "ort-rtn": "onnxruntime MatMulNBitsQuantizer, RTN",
    "ort-hqq": "onnxruntime MatMulNBitsQuantizer, HQQ",
}
MODELS = {
    # model: (format, symmetric, group size, default tools)
    "smollm2": (
        "int4",
        True,
        64,
        "qc-rtn,qc-awq,qc-se,qc-gptq,qc-awq-se,qc-awq-se-gptq,nncf-awq-se,ort-rtn",
    ),
    "minilm": (
        "int4",
        False,
        128,
        "qc-int8,nncf-int8,qc-rtn,qc-awq,qc-se,qc-gptq,qc-se-gptq,qc-awq-se-gptq,nncf-rtn,nncf-se,nncf-gptq,ort-rtn,ort-hqq",
    ),
}


def _mode(tool: str, model: str) -> tuple[str, bool, int]:
    """(format, symmetric, group size) a tool runs with: the model's INT4 mode, or INT8 per channel."""
    if tool.endswith("int8"):
        return "int8", False, 0
    for fmt in ("nf4", *FP4):
        if tool.startswith(f"qc-{fmt}"):
            return fmt, True, int(MODELS[model][2])  # type: ignore[call-overload]
    fmt, symmetric, group = MODELS[model][:3]
    return str(fmt), bool(symmetric), int(group)  # type: ignore[call-overload]


def describe(tool: str, model: str) -> str:
    """One line saying what `tool` ran."""
    fmt, symmetric, group = _mode(tool, model)
    fixed = {"mxfp4": 32, "nvfp4": 16}.get(fmt)
    grouping = f"blocks of {fixed}" if fixed else (f"group {group}" if group else "per channel")
    mode = f"{fmt} {'sym' if symmetric else 'asym'} {grouping}"
    if tool in QCOMPILER_TOOLS:
        algorithms = "+".join(QCOMPILER_TOOLS[tool]) or "rtn"
        kernel = " (our MatMulFP4 op, numpy in onnxruntime-extensions)" if fmt in FP4 else ""
        target = "openvino-cpu" if tool in OPENVINO_TOOLS else "ort-cpu"
        source = " from the OpenVINO IR (.xml) of the FP32 model" if tool in IR_INPUT_TOOLS else ""
        return (
            f"qcompiler --target {target}{source} --weights {mode}, {algorithms}; embeddings and last MatMul "
            f"INT8 (NNCF's policy){kernel}"
        )
    return f"{PEERS[tool]}, {mode}" + ("; embeddings and last layer INT8 (default)" if "nncf" in tool else "")


def nncf_int4(model, tool: str, symmetric: bool, group: int, feeds):
    """NNCF compress_weights INT4 on `model` (an openvino.Model or onnx.ModelProto); the tool's
    name says which algorithms (``rtn`` tools are data-free)."""
    import nncf

    data_aware = not tool.endswith("-rtn")
    options = {"gptq": True} if "gptq" in tool else {}  # the ONNX backend has no GPTQ argument
    return nncf.compress_weights(
        model,
        mode=nncf.CompressWeightsMode.INT4_SYM if symmetric else nncf.CompressWeightsMode.INT4_ASYM,
        group_size=group,
        ratio=1.0,
        dataset=nncf.Dataset(feeds) if data_aware else None,
        subset_size=len(feeds),
        awq="awq" in tool,
        scale_estimation="se" in tool,
        **options,
    )


def compile_with(tool: str, model_name: str, model: pathlib.Path, feeds, output: pathlib.Path) -> None:
    """Run one tool; writes `output` (.onnx, or .xml for NNCF and the openvino-cpu tools)."""
    fmt, symmetric, group = _mode(tool, model_name)
    if tool in QCOMPILER_TOOLS:
        import qcompiler

        flags = {name: True for name in QCOMPILER_TOOLS[tool]}
        compression = qcompiler.CompressionOptions(
            format=qcompiler.WeightFormat(fmt), group_size=group, symmetric=symmetric, **flags
        )
        target = "openvino-cpu" if tool in OPENVINO_TOOLS else "ort-cpu"
        result = qcompiler.compile(
            model, target, qcompiler.CompileOptions(compression=compression), data=feeds, progress=False
        )
        peers.save_result(result, output)
    elif tool.startswith("nncf-onnx"):
        import onnx

        onnx.save(nncf_int4(onnx.load(str(model)), tool, symmetric, group, feeds), str(output))
    elif tool.startswith("nncf"):
        import nncf
        import openvino as ov

        if fmt == "int8":
            compressed = nncf.compress_weights(
                ov.convert_model(str(model)), mode=nncf.CompressWeightsMode.INT8_ASYM
            )
        else:
            compressed = nncf_int4(ov.convert_model(str(model)), tool, symmetric, group, feeds)
        ov.save_model(compressed, str(output), compress_to_fp16=False)
    elif tool.startswith("ort"):
        import onnx
        from onnxruntime.quantization import matmul_nbits_quantizer as nbits

        config = (
            nbits.HQQWeightOnlyQuantConfig(block_size=group, bits=4)
            if tool == "ort-hqq"
            else nbits.DefaultWeightOnlyQuantConfig(
                block_size=group, is_symmetric=symmetric, accuracy_level=4
            )
        )
        quantizer = nbits.MatMulNBitsQuantizer(
            onnx.load(model), block_size=group, is_symmetric=symmetric, accuracy_level=4, algo_config=config
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(output), use_external_data_format=False)
    else:
        raise SystemExit(f"unknown tool {tool}")


def worker(args: argparse.Namespace) -> None:
    """Child process: compile, print wall time and own peak RSS."""
    from qcompiler.report import peak_rss_mb

    feeds = peers.load_feeds(args.calibration)
    start = time.perf_counter()
    compile_with(args.worker, args.model_name, args.model, feeds, args.output)
    print(
        json.dumps({"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(peak_rss_mb(), 1)})
    )


class Evaluator:
    """The model's metric on the same held-out data for every artifact."""

    def __init__(self, model_name: str, windows: int) -> None:
        import qcompiler
        from qcompiler.data import TextSource, TokenWindows, input_specs
        from qcompiler.models import CALIBRATION_TEXT, EVALUATION_TEXT, minilm, smollm2

        self.model_name = model_name
        module = smollm2 if model_name == "smollm2" else minilm
        self.model_path = module.build()
        tokenizer = module.tokenizer_path()
        specs = input_specs(qcompiler.load(self.model_path))
        if model_name == "smollm2":
            test_text = SHARED_TEST_SPLIT if SHARED_TEST_SPLIT.exists() else EVALUATION_TEXT
            self.evaluation = list(TokenWindows(test_text, tokenizer, specs, seq_len=512, windows=windows))
            self.calibration = TokenWindows(CALIBRATION_TEXT, tokenizer, specs, seq_len=512, windows=28)
            self.description = (
                f"perplexity on {len(self.evaluation)} windows of 512 tokens of {test_text.name}"
            )
            self.calibration_description = "28 windows of 512 tokens, python-docs train slice"
        else:
            self.evaluation = list(TextSource(EVALUATION_TEXT, tokenizer, specs, samples=600, batch_size=16))
            self.calibration = TextSource(CALIBRATION_TEXT, tokenizer, specs, samples=300, batch_size=1)
            self.description = (
                "sentence-embedding cosine vs FP32 on 600 paragraphs of the python-docs test slice"
            )
            self.calibration_description = "300 paragraphs, python-docs train slice, one per feed"
            self.reference = self._embeddings(self.model_path)

    def _embeddings(self, path: pathlib.Path) -> np.ndarray:
        return peers.Runner(path).outputs(self.evaluation, "sentence_embedding")

    def measure(self, path: pathlib.Path) -> dict[str, object]:
        """The metric, evaluation speed and size of one artifact."""
        from qcompiler.metrics import fidelity

        start = time.perf_counter()
        row: dict[str, object] = {
            "runtime": "openvino" if path.suffix == ".xml" else "onnxruntime",
            "size_mb": peers.artifact_mb(path),
        }
        if self.model_name == "smollm2":
            perplexity, count = peers.Runner(path).perplexity(self.evaluation)
            row["perplexity"] = round(perplexity, 3)
            row["tokens_per_s"] = round(count / (time.perf_counter() - start), 1)
        else:
            score = fidelity(self.reference, self._embeddings(path))
            row["mean_cosine"], row["min_cosine"] = round(score.mean_cosine, 4), round(score.min_cosine, 4)
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_name", choices=sorted(MODELS))
    parser.add_argument("--tools", help="comma-separated: " + ", ".join([*QCOMPILER_TOOLS, *PEERS]))
    parser.add_argument("--windows", type=int, default=32, help="SmolLM2: 512-token test windows")
    parser.add_argument("--reuse", action="store_true", help="keep earlier rows of tools not run now")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    args = peers.parse_or_work(parser, worker)
    if args is None:
        return
    from qcompiler.report import versions

    tools = (args.tools or MODELS[args.model_name][3]).split(",")
    evaluator = Evaluator(args.model_name, args.windows)
    results_path = args.out / f"weight_compression_{args.model_name}.json"
    rows: dict[str, dict] = {}
    if args.reuse and results_path.exists():
        rows = {k: v for k, v in json.loads(results_path.read_text())["rows"].items() if k not in tools}
    rows["fp32"] = {"description": "FP32 reference", **evaluator.measure(evaluator.model_path)}
    print("fp32", rows["fp32"], file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="qcompile-bench-") as folder:
        work = pathlib.Path(folder)
        calibration = work / "calibration"
        peers.save_feeds(evaluator.calibration, calibration)
        openvino_ir = work / "fp32.xml"
        if any(tool in IR_INPUT_TOOLS for tool in tools):
            import openvino as ov

            ov.save_model(
                ov.convert_model(str(evaluator.model_path)), str(openvino_ir), compress_to_fp16=False
            )
        for tool in tools:
            openvino = (
                tool.startswith("nncf") and not tool.startswith("nncf-onnx")
            ) or tool in OPENVINO_TOOLS
            source = openvino_ir if tool in IR_INPUT_TOOLS else evaluator.model_path
            output = work / (f"{tool}.xml" if openvino else f"{tool}.onnx")
            command = [
                sys.executable,
                __file__,
                args.model_name,
                "--worker",
                tool,
                "--model",
                str(source),
            ]
            command += ["--calibration", str(calibration), "--output", str(output)]
            process = subprocess.run(command, capture_output=True, text=True, check=False)
            if process.returncode != 0:
                rows[tool] = {
                    "description": describe(tool, args.model_name),
                    "error": process.stderr.strip().splitlines()[-1][:300],
                }
                print(tool, rows[tool], file=sys.stderr, flush=True)
                continue
            measured = json.loads(process.stdout.strip().splitlines()[-1])
            try:
                evaluated = evaluator.measure(output)
            except Exception as exc:  # a peer's artifact its runtime refuses is a result too
                rows[tool] = {
                    "description": describe(tool, args.model_name),
                    **measured,
                    "error": f"compiled, but does not run: {str(exc).splitlines()[-1][:250]}",
                }
                print(tool, rows[tool], file=sys.stderr, flush=True)
                continue
            rows[tool] = {"description": describe(tool, args.model_name), **measured, **evaluated}
            if "perplexity" in rows[tool]:
                change = 100 * (rows[tool]["perplexity"] / rows["fp32"]["perplexity"] - 1)
                rows[tool]["perplexity_vs_fp32"] = f"{change:+.1f} %"
            print(tool, rows[tool], file=sys.stderr, flush=True)
    result = {
        "model": args.model_name,
        "calibration": evaluator.calibration_description,
        "evaluation": evaluator.description,
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
    """Replace this model's weight-compression section of docs/benchmarks.md."""
    smollm = result["model"] == "smollm2"
    metric = "perplexity | vs FP32" if smollm else "mean / min cosine | "
    lines = [
        f"| tool | runtime | {metric} | compile s | peak RSS MB | size MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        if "error" in row:
            lines.append(f"| {name} | | failed: {row['error'][:100]} | | | | |")
            continue
        value = (
            f"{row['perplexity']} | {row.get('perplexity_vs_fp32', '')}"
            if smollm
            else f"{row['mean_cosine']:.4f} / {row['min_cosine']:.4f} | "
        )
        lines.append(
            f"| {name} | {row['runtime']} | {value} | {row.get('seconds', '')} | {row.get('peak_rss_mb', '')} | {row['size_mb']} |"
        )
    legend = "\n".join(f"- `{name}`: {row['description']}" for name, row in result["rows"].items())
    heading = f"Weight-only INT4, {'SmolLM2-135M' if smollm else 'MiniLM'}"
    section = (
        f"## {heading}\n\nCalibration: {result['calibration']}. Evaluation: {result['evaluation']}.\n"
        f"Generated by `python benchmarks/weight_compression.py {result['model']}`.\n\n"
        + "\n".join(lines)
        + f"\n\n{legend}\n"
    )
    peers.replace_section(path, heading, section)


if __name__ == "__main__":
    main()
