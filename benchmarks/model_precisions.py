"""The models users bring: MiniLM as FP32, FP16 (onnxruntime's converter, with and without
``keep_io_types``) and FP16-compressed OpenVINO IR (``openvino.save_model``'s defaults), each
compiled W8A8 and INT4 g128 SE+GPTQ for ort-cpu and openvino-cpu, in one run.

Every compile gets the same calibration feeds (python-docs train slice); every artifact is
measured against the FP32 model's sentence embeddings on held-out paragraphs (mean / min cosine),
with its size and the float types its initializers are stored in. The claim checked: an FP16 input
compiles to the accuracy of the FP32 input (within 0.001 mean cosine) and stays FP16.

    python benchmarks/model_precisions.py [--inputs fp32,fp16,fp16-io,fp16-ir] [--jobs ...]

Writes ``results/model_precisions.json`` and the table in ``docs/benchmarks.md``.
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
    parser.add_argument("--inputs", default=",".join(INPUTS))
    parser.add_argument("--jobs", default=",".join(JOBS))
    parser.add_argument("--samples", type=int, default=128, help="calibration paragraphs")
    parser.add_argument("--eval", type=int, default=300, help="evaluation paragraphs")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    import qcompiler
    from qcompiler.data import TextSource, input_specs
    from qcompiler.metrics import fidelity
    from qcompiler.models import CALIBRATION_TEXT, EVALUATION_TEXT, minilm

    model_path = minilm.build()
    specs = input_specs(qcompiler.load(model_path))
    tokenizer = minilm.tokenizer_path()
    evaluation = list(TextSource(EVALUATION_TEXT, tokenizer, specs, samples=args.eval, batch_size=16))
    calibration = list(TextSource(CALIBRATION_TEXT, tokenizer, specs, samples=args.samples, batch_size=8))
    reference = peers.Runner(model_path).outputs(evaluation, EMBEDDING)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="qcompile-precisions-") as folder:
        work = pathlib.Path(folder)
        inputs = make_inputs(model_path, work)
        for form in args.inputs.split(","):
            rows[f"{form} (input)"] = {
                "description": f"the {form} input itself, uncompiled",
                "size_mb": peers.artifact_mb(inputs[form]),
                **_fidelity(fidelity(reference, peers.Runner(inputs[form]).outputs(evaluation, EMBEDDING))),
                "float_types": float_types(inputs[form]),
            }
            for job in args.jobs.split(","):
                target, options = options_for(job)
                if form == "fp16-ir" and target == "ort-cpu":
                    continue  # an IR compiles for OpenVINO targets only
                start = time.perf_counter()
                result = qcompiler.compile(inputs[form], target, options, data=calibration, progress=False)
                seconds = time.perf_counter() - start
                output = work / f"{form}-{job}{'.xml' if target.startswith('openvino') else '.onnx'}"
                result.save(output)
                measured = fidelity(reference, peers.Runner(output).outputs(evaluation, EMBEDDING))
                rows[f"{form} {job}"] = {
                    "description": f"{form} input, {job} ({target})",
                    "seconds": round(seconds, 1),
                    "size_mb": peers.artifact_mb(output),
                    **_fidelity(measured),
                    "float_types": float_types(output),
                    "precision": result.report.model.get("precision"),
                }
                print(f"{form:8s} {job:9s} {json.dumps(rows[f'{form} {job}'])}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model_precisions.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    table = [
        "| input | job | mean / min cosine vs FP32 | size MB | float weights stored as |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        form, job = name.split(" ", 1)
        types = ", ".join(f"{k} {v:.0%}" for k, v in row["float_types"].items())
        table.append(
            f"| {form} | {job} | {row['cosine_mean']:.4f} / {row['cosine_min']:.4f} | {row['size_mb']} | {types} |"
        )
    print("\n".join(table))
    peers.write_table_section(
        "Model precisions (MiniLM FP32 / FP16 / FP16-compressed IR)",
        f"`python benchmarks/model_precisions.py`: {args.samples} calibration paragraphs, "
        f"cosine of sentence embeddings vs the FP32 model on {args.eval} held-out paragraphs.",
        table,
        rows,
    )


def _fidelity(measured) -> dict[str, float]:
    return {"cosine_mean": round(measured.mean_cosine, 5), "cosine_min": round(measured.min_cosine, 5)}


if __name__ == "__main__":
    main()
