"""Decode-step latency of SmolLM2-135M with KV cache: FP32 vs qcompiler INT4 vs onnxruntime's own
MatMulNBitsQuantizer, in one run (batch 1, one new token after a 256-token context, onnxruntime
CPU, 2 threads, median of 30 runs).

    python benchmarks/decode_latency.py [MODEL_DIR]   # optimum's text-generation-with-past export;
                                                      # default: built by models/smollm2_kv.py

Both INT4 models are RTN, symmetric, group 64 (the latency does not depend on the algorithm);
qcompiler keeps its policy (embedding and LM head INT8), onnxruntime's quantizer leaves the
embedding float and the tied LM head (a Transpose of it) float. Writes a section of
docs/benchmarks.md and results/decode_latency.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import numpy as np
import peers

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64


def decode_feed(names: dict[str, str], past: int) -> dict[str, np.ndarray]:
    """One new token after `past` cached positions (random cache: latency only).

    `names`: the session's inputs and their types (an FP16 model's cache is float16).
    """
    rng = np.random.default_rng(0)
    feed = {
        "input_ids": np.array([[1234]], np.int64),
        "attention_mask": np.ones((1, past + 1), np.int64),
        "position_ids": np.array([[past]], np.int64),
    }
    for layer in range(LAYERS):
        for kind in ("key", "value"):
            feed[f"past_key_values.{layer}.{kind}"] = rng.standard_normal(
                (1, KV_HEADS, past, HEAD_DIM)
            ).astype(
                np.float16
                if names.get(f"past_key_values.{layer}.{kind}") == "tensor(float16)"
                else np.float32
            )
    return {name: value for name, value in feed.items() if name in names}


def median_ms(session, feed: dict, repeats: int = 30) -> float:
    """Median decode-step time of one session."""
    for _ in range(5):
        session.run(["logits"], feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(["logits"], feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def greedy_tokens(session, prompt: list[int], steps: int) -> list[int]:
    """Greedy generation with the KV cache fed back: the `steps` tokens after `prompt`."""
    names = {i.name: i.type for i in session.get_inputs()}
    feed = decode_feed(names, 0)
    feed.update(
        input_ids=np.array([prompt], np.int64),
        attention_mask=np.ones((1, len(prompt)), np.int64),
        position_ids=np.arange(len(prompt))[None, :],
    )
    outputs = [o.name for o in session.get_outputs()]
    tokens: list[int] = []
    for _ in range(steps):
        results = dict(zip(outputs, session.run(outputs, feed), strict=True))
        tokens.append(int(results["logits"][0, -1].argmax()))
        total = feed["attention_mask"].shape[1]
        feed = {
            name.replace("present", "past_key_values"): value
            for name, value in results.items()
            if name != "logits"
        }
        feed.update(
            input_ids=np.array([[tokens[-1]]], np.int64),
            attention_mask=np.ones((1, total + 1), np.int64),
            position_ids=np.array([[total]], np.int64),
        )
        feed = {name: value for name, value in feed.items() if name in names}
    return tokens


PROMPT = "The Python standard library module itertools provides"
STEPS = 32


def generation_agreement(
    paths: dict[str, pathlib.Path], references: tuple[str, ...]
) -> dict[str, dict[str, str]]:
    """For each model, how many of STEPS greedy tokens after PROMPT equal each reference model's
    before the first difference."""
    from tokenizers import Tokenizer

    from qcompiler.backends.onnxruntime.session import create_session, session_options
    from qcompiler.models import smollm2

    prompt = Tokenizer.from_file(str(smollm2.tokenizer_path())).encode(PROMPT).ids
    generated = {
        name: greedy_tokens(create_session(path, session_options(threads=2)), prompt, STEPS)
        for name, path in paths.items()
    }
    agreement: dict[str, dict[str, str]] = {}
    for name, tokens in generated.items():
        agreement[name] = {}
        for reference in references:
            pairs = zip(tokens, generated[reference], strict=True)
            same = next((i for i, (a, b) in enumerate(pairs) if a != b), STEPS)
            agreement[name][reference] = f"{same}/{STEPS}"
    return agreement


def latencies(paths: dict[str, pathlib.Path], past: int, rounds: int = 3) -> dict[str, float]:
    """Decode-step latency of every model, timed in turns (the best round counts)."""
    from qcompiler.backends.onnxruntime.session import create_session, session_options

    sessions = {name: create_session(path, session_options(threads=2)) for name, path in paths.items()}
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, session in sessions.items():
            feed = decode_feed({i.name: i.type for i in session.get_inputs()}, past)
            best[name] = min(best.get(name, float("inf")), median_ms(session, feed))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "model_dir",
        nargs="?",
        type=pathlib.Path,
        help="folder holding optimum's model.onnx (default: models/smollm2_kv.py)",
    )
    parser.add_argument("--past", type=int, default=256)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    import qcompiler

    if args.model_dir is None:
        from qcompiler.models import smollm2_kv

        args.model_dir = smollm2_kv.build().parent
    fp32 = args.model_dir / "model.onnx"
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="qcompile-decode-") as folder:
        work = pathlib.Path(folder)
        ours, unfused = work / "qcompiler.onnx", work / "qcompiler-unfused.onnx"
        for path, fuse in ((ours, True), (unfused, False)):
            compression = qcompiler.CompressionOptions(group_size=64, symmetric=True, fuse_attention=fuse)
            result = qcompiler.compile(
                fp32, "ort-cpu", qcompiler.CompileOptions(compression=compression), progress=False
            )
            qcompiler.save(result.model, path)
        fp16 = work / "fp16.onnx"  # what onnxruntime's own converter makes of the export
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(fp32), keep_io_types=False), fp16)
        ours16 = work / "qcompiler-fp16.onnx"
        compression = qcompiler.CompressionOptions(group_size=64, symmetric=True)
        result = qcompiler.compile(
            fp16, "ort-cpu", qcompiler.CompileOptions(compression=compression), progress=False
        )
        qcompiler.save(result.model, ours16)
        fp32_fused = work / "fp32-fused.onnx"  # the fusions alone, on float weights (no rounding noise)
        from qcompiler.registry import backend_named
        from qcompiler.rewrites.normalize import NormalizePass

        float_model = qcompiler.load(fp32)
        NormalizePass(rewrite=False)(float_model)
        backend_named("onnxruntime").fuse_decoder(float_model)
        qcompiler.save(float_model, fp32_fused)
        del float_model
        theirs = work / "ort.onnx"
        config = nbits.DefaultWeightOnlyQuantConfig(block_size=64, is_symmetric=True, accuracy_level=4)
        quantizer = nbits.MatMulNBitsQuantizer(
            onnx.load(fp32), block_size=64, is_symmetric=True, accuracy_level=4, algo_config=config
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(theirs), use_external_data_format=False)
        models = (
            ("fp32", fp32, "FP32 (optimum export)"),
            (
                "fp32-fused",
                fp32_fused,
                "FP32 with qcompiler's decoder fusions (GroupQueryAttention, RMSNorm)",
            ),
            (
                "qcompiler-int4",
                ours,
                "qcompiler --weights int4 --group-size 64 --symmetric (RTN; MatMulNBits acc 4, INT8 head/embedding; "
                "attention fused into GroupQueryAttention)",
            ),
            (
                "qcompiler-int4-unfused",
                unfused,
                "the same with --unfused-attention (the export's attention nodes)",
            ),
            ("fp16", fp16, "FP16: the export through onnxruntime's convert_float_to_float16"),
            (
                "qcompiler-int4-fp16",
                ours16,
                "qcompiler INT4 as qcompiler-int4, compiled from the FP16 model (FP16 activations and scales)",
            ),
            (
                "ort-int4",
                theirs,
                "onnxruntime MatMulNBitsQuantizer RTN, block 64, symmetric, accuracy_level 4",
            ),
        )
        timed = latencies({name: path for name, path, _ in models}, args.past)
        agreement = generation_agreement(
            {name: path for name, path, _ in models}, ("fp32", "qcompiler-int4-unfused")
        )
        for name, path, description in models:
            rows[name] = {
                "description": description,
                "decode_ms": round(timed[name], 2),
                "greedy_prefix_equal_to_fp32": agreement[name]["fp32"],
                "greedy_prefix_equal_to_unfused_int4": agreement[name]["qcompiler-int4-unfused"],
                "size_mb": peers.artifact_mb(path),
            }
    for row in rows.values():
        row["speedup_vs_fp32"] = round(rows["fp32"]["decode_ms"] / row["decode_ms"], 2)
    result_json = {
        "past": args.past,
        "rows": rows,
        "versions": {"onnxruntime": peers.version_of("onnxruntime")},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_latency.json").write_text(json.dumps(result_json, indent=2) + "\n")
    lines = [
        "| model | decode step ms | speed-up vs FP32 | size MB | greedy tokens = FP32's | = unfused INT4's |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {row['decode_ms']} | {row['speedup_vs_fp32']:.2f} | {row['size_mb']} "
        f"| {row['greedy_prefix_equal_to_fp32']} | {row['greedy_prefix_equal_to_unfused_int4']} |"
        for name, row in rows.items()
    ]
    intro = (
        f"Batch 1, one new token after {args.past} cached tokens, onnxruntime CPU, 2 threads, median of 30 runs, "
        "models timed in turns (best of 3 rounds). Greedy tokens: how many of the "
        f"{STEPS} tokens generated after '{PROMPT}' (KV cache fed back) equal FP32's (or the unfused INT4 "
        "model's: same weights, so the fusion alone) before the first difference. Generated by "
        "`python benchmarks/decode_latency.py` (the KV-cache export of `models/smollm2_kv.py`)."
    )
    peers.write_table_section("SmolLM2-135M decode step (KV cache)", intro, lines, rows)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
