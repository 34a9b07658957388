"""The models users bring, in the precisions they come in, compiled side by side in one run.

MiniLM as FP32, FP16 (onnxruntime's converter, with and without ``keep_io_types``) and
FP16-compressed OpenVINO IR (``openvino.save_model``'s defaults), each compiled W8A8 and INT4 g128
SE+GPTQ for ort-cpu and openvino-cpu; measured against the FP32 model's sentence embeddings on
held-out paragraphs (mean / min cosine). SmolLM2-135M exported in FP32, FP16 and BF16
(`qcompiler.models.smollm2 --dtype`), INT4 sym g64 AWQ+SE for ort-cpu and openvino-cpu;
perplexity on 512-token windows of the python-docs test split. Each row also gives the artifact's
size and the float types its initializers are stored in. The claims checked: an FP16 (BF16) input
compiles to the accuracy of the FP32 input and stays FP16 (BF16).

    python benchmarks/model_precisions.py [minilm|smollm2] [--inputs ...] [--jobs ...]

Writes ``results/model_precisions_<model>.json`` and a table in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import tempfile
import time

import peers

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMBEDDING = "sentence_embedding"
INPUTS = ("fp32", "fp16", "fp16-io", "fp16-ir")
JOBS = ("w8a8-ort", "w8a8-ov", "int4-ort", "int4-ov")
SMOLLM2_INPUTS = ("fp32", "fp16", "bf16")
SMOLLM2_JOBS = ("int4-ort", "int4-ov")
SHARED_TEST_SPLIT = ROOT.parent / "shared" / "data" / "python311-docs-en.test.txt"


def make_inputs(model_path: pathlib.Path, work: pathlib.Path) -> dict[str, pathlib.Path]:
    """The four forms of the model, as a user would make them."""
    import onnx
    import openvino as ov
    from onnxruntime.transformers.float16 import convert_float_to_float16

    paths = {"fp32": model_path}
    for name, keep_io in (("fp16", False), ("fp16-io", True)):
        paths[name] = work / f"{name}.onnx"
        onnx.save(convert_float_to_float16(onnx.load(model_path), keep_io_types=keep_io), paths[name])
    paths["fp16-ir"] = work / "fp16-ir.xml"
    ov.save_model(ov.convert_model(str(model_path)), str(paths["fp16-ir"]))  # compress_to_fp16 by default
    return paths


def options_for(job: str):
    """The compile options and target of one job."""
    import qcompiler
    from qcompiler.options import CompressionOptions, WeightFormat

    target = "ort-cpu" if job.endswith("-ort") else "openvino-cpu"
    if job.startswith("w8a8"):
        return target, qcompiler.CompileOptions(preset=qcompiler.Preset.TRANSFORMER, count_fusion=False)
    compression = CompressionOptions(
        format=WeightFormat.INT4, group_size=128, scale_estimation=True, gptq=True
    )
    return target, qcompiler.CompileOptions(compression=compression)


def float_types(path: pathlib.Path) -> dict[str, float]:
    """Share of float weight bytes per element type in the artifact (OpenVINO: constants)."""
    sizes: collections.Counter[str] = collections.Counter()
    if path.suffix == ".xml":
        import openvino as ov

        for op in ov.Core().read_model(str(path)).get_ordered_ops():
            if op.get_type_name() == "Constant" and op.get_output_element_type(0).is_real():
                sizes[op.get_output_element_type(0).get_type_name()] += op.get_byte_size()
    else:
        import onnx_ir as ir

        for value in ir.load(path).graph.initializers.values():
            dtype = value.dtype
            if dtype is not None and dtype.is_floating_point() and value.const_value is not None:
                sizes[dtype.name.lower()] += value.const_value.nbytes
    total = sum(sizes.values()) or 1
    return {name: round(size / total, 3) for name, size in sizes.most_common()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_name", nargs="?", choices=("minilm", "smollm2"), default="minilm")
    parser.add_argument("--inputs", default=None)
    parser.add_argument("--jobs", default=None)
    parser.add_argument("--samples", type=int, default=None, help="calibration paragraphs / windows")
    parser.add_argument("--eval", type=int, default=None, help="evaluation paragraphs / windows")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--reuse", action="store_true", help="keep earlier rows of inputs not run now")
    args = parser.parse_args()
    if args.model_name == "minilm":
        minilm_rows(args)
    else:
        smollm2_rows(args)


def minilm_rows(args: argparse.Namespace) -> None:
    """MiniLM's four input forms x four jobs (see the module docstring)."""
    import qcompiler
    from qcompiler.data import TextSource, input_specs
    from qcompiler.metrics import fidelity
    from qcompiler.models import CALIBRATION_TEXT, EVALUATION_TEXT, minilm

    args.samples, args.eval = args.samples or 128, args.eval or 300
    model_path = minilm.build()
    specs = input_specs(qcompiler.load(model_path))
    tokenizer = minilm.tokenizer_path()
    evaluation = list(TextSource(EVALUATION_TEXT, tokenizer, specs, samples=args.eval, batch_size=16))
    calibration = list(TextSource(CALIBRATION_TEXT, tokenizer, specs, samples=args.samples, batch_size=8))
    reference = peers.Runner(model_path).outputs(evaluation, EMBEDDING)
    forms = (args.inputs or ",".join(INPUTS)).split(",")
    rows = _earlier_rows(args, forms)
    with tempfile.TemporaryDirectory(prefix="qcompile-precisions-") as folder:
        work = pathlib.Path(folder)
        inputs = make_inputs(model_path, work)
        for form in forms:
            rows[f"{form} (input)"] = {
                "description": f"the {form} input itself, uncompiled",
                "size_mb": peers.artifact_mb(inputs[form]),
                **_fidelity(fidelity(reference, peers.Runner(inputs[form]).outputs(evaluation, EMBEDDING))),
                "float_types": float_types(inputs[form]),
            }
            for job in (args.jobs or ",".join(JOBS)).split(","):
                target, options = options_for(job)
                if form == "fp16-ir" and target == "ort-cpu":
                    continue  # an IR compiles for OpenVINO targets only
                row, output = _compile(inputs[form], target, options, work / f"{form}-{job}", calibration)
                row.update(
                    _fidelity(fidelity(reference, peers.Runner(output).outputs(evaluation, EMBEDDING)))
                )
                rows[f"{form} {job}"] = {"description": f"{form} input, {job} ({target})", **row}
                print(f"{form:8s} {job:9s} {json.dumps(rows[f'{form} {job}'])}", flush=True)
    table = [
        "| input | job | mean / min cosine vs FP32 | size MB | float weights stored as |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        form, job = name.split(" ", 1)
        table.append(
            f"| {form} | {job} | {row['cosine_mean']:.4f} / {row['cosine_min']:.4f} | {row['size_mb']} | {_types(row)} |"
        )
    _write(
        args,
        rows,
        table,
        "Model precisions: MiniLM FP32 / FP16 / FP16-compressed IR",
        f"`python benchmarks/model_precisions.py minilm`: {args.samples} calibration paragraphs, "
        f"cosine of sentence embeddings vs the FP32 model on {args.eval} held-out paragraphs; "
        "W8A8 = transformer preset, INT4 = g128 asymmetric, scale estimation + GPTQ.",
    )


def smollm2_rows(args: argparse.Namespace) -> None:
    """SmolLM2 exported in three precisions x INT4 AWQ+SE for two targets (see the module docstring)."""
    import qcompiler
    from qcompiler.data import TokenWindows, input_specs
    from qcompiler.errors import QCompileError
    from qcompiler.models import CALIBRATION_TEXT, EVALUATION_TEXT, smollm2
    from qcompiler.options import CompressionOptions, WeightFormat

    args.samples, args.eval = args.samples or 16, args.eval or 16
    paths = {
        "fp32": smollm2.build(),
        "fp16": smollm2.build(dtype="float16"),
        "bf16": smollm2.build(dtype="bfloat16"),
    }
    tokenizer = smollm2.tokenizer_path()
    specs = input_specs(qcompiler.load(paths["fp32"]))
    test_text = SHARED_TEST_SPLIT if SHARED_TEST_SPLIT.exists() else EVALUATION_TEXT
    evaluation = list(TokenWindows(test_text, tokenizer, specs, seq_len=512, windows=args.eval))
    calibration = list(TokenWindows(CALIBRATION_TEXT, tokenizer, specs, seq_len=512, windows=args.samples))
    compression = CompressionOptions(
        format=WeightFormat.INT4, group_size=64, symmetric=True, awq=True, scale_estimation=True
    )
    options = qcompiler.CompileOptions(compression=compression)
    forms = (args.inputs or ",".join(SMOLLM2_INPUTS)).split(",")
    rows = _earlier_rows(args, forms)
    with tempfile.TemporaryDirectory(prefix="qcompile-precisions-") as folder:
        work = pathlib.Path(folder)
        for form in forms:
            source = paths[form]
            rows[f"{form} (input)"] = {
                "description": f"SmolLM2 exported in {form}, uncompiled",
                "size_mb": peers.artifact_mb(source),
                # onnxruntime has no BF16 kernels: the BF16 export is measured in OpenVINO CPU
                "perplexity": round(
                    peers.Runner(source, "openvino" if form == "bf16" else None).perplexity(evaluation)[0], 3
                ),
                "float_types": float_types(source),
            }
            print(form, rows[f"{form} (input)"], flush=True)
            for job in (args.jobs or ",".join(SMOLLM2_JOBS)).split(","):
                target = "ort-cpu" if job.endswith("-ort") else "openvino-cpu"
                name = f"{form} {job}"
                try:
                    row, output = _compile(source, target, options, work / f"{form}-{job}", calibration)
                except QCompileError as exc:  # BF16 for onnxruntime: refused in one line
                    rows[name] = {"description": f"{form} input, {job} ({target})", "error": str(exc)}
                    print(name, rows[name], flush=True)
                    continue
                row["perplexity"] = round(peers.Runner(output).perplexity(evaluation)[0], 3)
                rows[name] = {"description": f"{form} input, {job} ({target})", **row}
                print(name, rows[name], flush=True)
    for name, row in rows.items():
        reference = rows.get(f"fp32 {name.split(' ', 1)[1]}")
        if reference and "perplexity" in row and "perplexity" in reference:
            row["vs_fp32_input"] = f"{100 * (row['perplexity'] / reference['perplexity'] - 1):+.2f} %"
    table = [
        "| input | job | perplexity | vs FP32 input | size MB | float weights stored as |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        form, job = name.split(" ", 1)
        if "error" in row:
            table.append(f"| {form} | {job} | refused: {row['error'].split(': ', 1)[-1]} | | | |")
            continue
        table.append(
            f"| {form} | {job} | {row['perplexity']:.3f} | {row.get('vs_fp32_input', '')} | {row['size_mb']} | {_types(row)} |"
        )
    _write(
        args,
        rows,
        table,
        "Model precisions: SmolLM2-135M FP32 / FP16 / BF16",
        f"`python benchmarks/model_precisions.py smollm2`: INT4 symmetric g64, AWQ + scale estimation, "
        f"{args.samples} calibration windows of 512 tokens; perplexity on {args.eval} windows of 512 tokens "
        f"of {test_text.name}.",
    )


def _compile(
    source: pathlib.Path, target: str, options, stem: pathlib.Path, calibration
) -> tuple[dict, pathlib.Path]:
    """Compile and save one artifact; its row (time, size, float types, precision) and path."""
    import qcompiler

    start = time.perf_counter()
    result = qcompiler.compile(source, target, options, data=calibration, progress=False)
    seconds = time.perf_counter() - start
    output = result.save(stem.with_suffix(".xml" if target.startswith("openvino") else ".onnx"))
    row = {
        "seconds": round(seconds, 1),
        "size_mb": peers.artifact_mb(output),
        "float_types": float_types(output),
        "precision": result.report.model.get("precision"),
    }
    return row, output


def _earlier_rows(args: argparse.Namespace, forms: list[str]) -> dict[str, dict]:
    """With --reuse, the rows of the inputs not run now from the last results file."""
    path = args.out / f"model_precisions_{args.model_name}.json"
    if not args.reuse or not path.exists():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {name: row for name, row in rows.items() if name.split(" ", 1)[0] not in forms}


def _types(row: dict) -> str:
    return ", ".join(f"{k} {v:.0%}" for k, v in row["float_types"].items())


def _write(args: argparse.Namespace, rows: dict, table: list[str], heading: str, intro: str) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"model_precisions_{args.model_name}.json").write_text(
        json.dumps({"rows": rows}, indent=1) + "\n"
    )
    print("\n".join(table))
    peers.write_table_section(heading, intro, table, rows)


def _fidelity(measured) -> dict[str, float]:
    return {"cosine_mean": round(measured.mean_cosine, 5), "cosine_min": round(measured.min_cosine, 5)}


if __name__ == "__main__":
    main()
