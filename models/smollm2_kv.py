"""SmolLM2-135M-Instruct with KV cache (decode timing), exported by optimum in its own environment.

optimum-onnx pins transformers 4.57 while this project runs transformers 5, so the export runs in
a virtual environment made on first use in the cache (``optimum-venv``: torch 2.13.0 from local
disk, optimum-onnx, onnxruntime; PyPI only). Steps:

1. `smollm2.save_hf` writes the same FP32 weights as a plain Hugging Face folder;
2. ``optimum-cli export onnx --task text-generation-with-past`` exports it (inputs ``input_ids``,
   ``attention_mask``, ``position_ids``, ``past_key_values.N.key|value``; outputs ``logits``,
   ``present.N.key|value``);
3. the prefill logits of the export are checked against the no-cache model of `smollm2.build`
   before the folder is moved into place.

    python -m qcompiler.models.smollm2_kv [FOLDER] [--force]   # prints the model's path
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from qcompiler.errors import QCompileError
from qcompiler.models import build_cli, cache_dir, smollm2

FOLDER_NAME = "SmolLM2-135M-Instruct-kv"
VENV_NAME = "optimum-venv"
EXPORT_PACKAGES = (
    "torch==2.13.0",
    "transformers==4.57.6",
    "optimum==2.1.0",
    "optimum-onnx==0.1.0",
    "onnxruntime==1.32.0",
)
"""What the export environment installs (versions the export was checked with)."""


def export_environment(cache: pathlib.Path) -> pathlib.Path:
    """``optimum-cli`` of the export environment, made on first use."""
    venv = cache / VENV_NAME
    cli = venv / "bin" / "optimum-cli"
    if cli.exists():
        return cli
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *EXPORT_PACKAGES],
    ]
    for step in steps:
        if subprocess.run(step, check=False).returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            raise QCompileError(f"making the optimum export environment failed at: {' '.join(step)}")
    return cli


def prefill_error(model: pathlib.Path, reference: pathlib.Path, tokens: int = 37) -> float:
    """Largest |logit| difference between the KV-cache export (empty cache) and the no-cache model."""
    import onnxruntime as ort

    ids = np.random.default_rng(1).integers(100, 20000, (1, tokens), dtype=np.int64)
    mask = np.ones_like(ids)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feed: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask}
    for spec in session.get_inputs():
        if spec.name == "position_ids":
            feed[spec.name] = np.arange(tokens, dtype=np.int64)[None]
        elif spec.name.startswith("past_key_values."):
            heads, head_dim = spec.shape[1], spec.shape[3]
            feed[spec.name] = np.zeros((1, heads, 0, head_dim), np.float32)
    cached = session.run(["logits"], feed)[0]
    plain = ort.InferenceSession(str(reference), providers=["CPUExecutionProvider"])
    expected = plain.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    return float(np.abs(cached - expected).max())


def build(folder: pathlib.Path | None = None, *, force: bool = False) -> pathlib.Path:
    """Path of ``model.onnx`` of the KV-cache export, made on first use into `folder` (default: the cache)."""
    folder = folder or cache_dir()
    destination = folder / FOLDER_NAME
    path = destination / "model.onnx"
    if path.exists() and not force:
        return path
    cli = export_environment(cache_dir())
    hf = smollm2.save_hf(folder)
    with tempfile.TemporaryDirectory(prefix=".smollm2-kv-", dir=folder) as staging:
        staged = pathlib.Path(staging) / FOLDER_NAME
        command = [
            str(cli),
            "export",
            "onnx",
            "--model",
            str(hf),
            "--task",
            "text-generation-with-past",
            str(staged),
        ]
        if subprocess.run(command, check=False).returncode != 0:
            raise QCompileError(f"optimum's export failed: {' '.join(command)}")
        error = prefill_error(staged / "model.onnx", smollm2.build(folder))
        if error > smollm2.EXPORT_TOLERANCE:
            raise QCompileError(
                f"KV-cache export's prefill logits differ from the no-cache model by {error:.2e} "
                f"(> {smollm2.EXPORT_TOLERANCE})"
            )
        if destination.exists():
            shutil.rmtree(destination)
        staged.replace(destination)
    return path


def main(argv: list[str] | None = None) -> None:
    """Command line: build the model and print its path."""
    build_cli(build, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
