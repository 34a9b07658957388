"""Synthetic Llama-architecture decoders with random weights at about 1B and 3B parameters.

For measuring compile time and memory at the sizes people quantize: no package ships FP16 / FP32
weights of a real LLM larger than SmolLM2 (../shared/MODELS.md), so these have transformers'
own random initialisation (seeded), SmolLM2's vocabulary (so its tokenizer and ``--text`` work)
and the shapes of TinyLlama-1.1B / a 3B Llama. Accuracy on them means nothing; time and memory do.
Exported like `smollm2` (dynamo, opset 17, ``logits = model(input_ids, attention_mask)``, no KV
cache), in FP16 or FP32, with external data.

    python -m qcompiler.models.synthetic_llama [FOLDER] --size 1b|3b [--dtype float16|float32]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

from qcompiler.errors import QCompileError
from qcompiler.models import cache_dir
from qcompiler.models.causal_lm_export import export_logits, logits_module

SIZES: dict[str, dict[str, int]] = {
    # 1.07B: TinyLlama-1.1B's shapes with SmolLM2's 49152-token vocabulary, tied embeddings
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
    },
    # for tests: the same graph at 1.6M parameters
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    # 2.97B
    "3b": {
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
    },
}
VOCAB = 49152
TINY_VOCAB = 512
PRECISIONS = ("float16", "float32")


def file_name(size: str, dtype: str) -> str:
    """``llama-1b.float16.onnx`` and the like (weights in ``<name>.data``)."""
    return f"llama-{size}.{dtype}.onnx"


def build(
    folder: pathlib.Path | None = None, *, size: str = "1b", dtype: str = "float16", force: bool = False
) -> pathlib.Path:
    """Path of the synthetic decoder, exported on first use into `folder` (default: the cache)."""
    if size not in SIZES or dtype not in PRECISIONS:
        raise QCompileError(f"synthetic Llama: sizes {', '.join(SIZES)}, precisions {', '.join(PRECISIONS)}")
    folder = folder or cache_dir()
    path = folder / file_name(size, dtype)
    if force or not path.exists():
        export(path, size, dtype)
    return path


def export(path: pathlib.Path, size: str, dtype: str) -> pathlib.Path:
    """Export the random model to `path` (+ ``.data``), written atomically."""
    import onnx_ir as ir
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qcompiler.io import save

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB if size == "tiny" else VOCAB,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        **SIZES[size],
    )
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()

    with tempfile.TemporaryDirectory(prefix=".llama-", dir=path.parent) as staging:
        staged = pathlib.Path(staging) / path.name
        export_logits(logits_module(model), staged, external_data=True)
        del model
        save(ir.load(staged), path, external_data=True)
    return path


def main(argv: list[str] | None = None) -> None:
    """Command line: build the model and print its path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=pathlib.Path, help="output folder (default: cache)")
    parser.add_argument("--size", choices=SIZES, default="1b")
    parser.add_argument("--dtype", choices=PRECISIONS, default="float16")
    parser.add_argument("--force", action="store_true", help="re-export even if cached")
    args = parser.parse_args(argv)
    print(build(args.folder, size=args.size, dtype=args.dtype, force=args.force))  # noqa: T201


if __name__ == "__main__":
    main()
