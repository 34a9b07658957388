"""Exporting a transformers causal LM as ``logits = model(input_ids, attention_mask)`` (no KV cache).

The one export `smollm2` and `synthetic_llama` share: torch's dynamo exporter at opset 17, batch
and sequence dynamic.
"""

from __future__ import annotations

import pathlib


def logits_module(model):  # (transformers model) -> torch.nn.Module
    """`model` wrapped to take (input_ids, attention_mask) and return only the logits."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):  # noqa: D102
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return Logits(model).eval()


def export_logits(module, path: pathlib.Path, *, external_data: bool) -> None:
    """Export `module` (from `logits_module`) to `path` with dynamo, opset 17."""
    import torch

    ids = torch.randint(100, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    program = torch.onnx.export(
        module,
        (ids, torch.ones_like(ids)),
        dynamo=True,
        opset_version=17,
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_shapes={"input_ids": dims, "attention_mask": dims},
    )
    program.save(str(path), external_data=external_data)
