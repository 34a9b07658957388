"""Where a --max-drop budget holds: the same artifacts measured on two splits at two context lengths.

    python benchmarks/budget_context.py ARTIFACT.onnx [ARTIFACT.onnx ...] [--windows 128,48]

SmolLM2's perplexity (FP32, then each artifact) on the python-docs valid and test splits
(``../shared/data``; the bundled slices when absent) cut into 128-token and 512-token windows.
Each artifact's relative drop from FP32 comes with a 95 % paired bootstrap interval over the
windows, so the grid separates the two suspects of a budget that did not carry to deployment:
the split the search validated on (valid vs test at one length) and the context (128 vs 512 on
one split). Writes ``results/budget_context.json``; the table is in docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np
import peers

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def splits() -> dict[str, pathlib.Path]:
    """The valid and test text: the full splits when ../shared has them, else the bundled slices."""
    from qcompiler.models import EVALUATION_TEXT, VALIDATION_TEXT

    full = {"valid": SHARED / "python311-docs-en.valid.txt", "test": SHARED / "python311-docs-en.test.txt"}
    if all(path.exists() for path in full.values()):
        return full
    return {"valid": VALIDATION_TEXT, "test": EVALUATION_TEXT}


def window_nll(runner: peers.Runner, windows) -> np.ndarray:
    """Summed next-token NLL of each window."""
    from qcompiler.metrics import next_token_nll

    return np.array([next_token_nll(runner.run(feed, "logits"), feed["input_ids"])[0] for feed in windows])


def relative_drop(nll: np.ndarray, float_nll: np.ndarray, tokens: int, resamples: int = 2000) -> dict:
    """Perplexity ratio - 1 over the windows, and its 95 % paired bootstrap interval."""
    picks = np.random.default_rng(0).integers(0, len(nll), size=(resamples, len(nll)))
    drops = np.exp((nll[picks].sum(axis=1) - float_nll[picks].sum(axis=1)) / (len(nll) * tokens)) - 1
    low, high = np.quantile(drops, [0.025, 0.975])
    point = float(np.exp((nll.sum() - float_nll.sum()) / (len(nll) * tokens)) - 1)
    return {"drop": round(point, 5), "interval": [round(float(low), 5), round(float(high), 5)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=pathlib.Path)
    parser.add_argument("--windows", default="128,48", help="windows of 128 and of 512 tokens per split")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    from qcompiler import io
    from qcompiler.data import TokenWindows, input_specs
    from qcompiler.models import smollm2

    model = smollm2.build()
    specs = input_specs(io.load(model))
    counts = dict(zip((128, 512), (int(n) for n in args.windows.split(",")), strict=True))
    grid = {
        f"{split}{length}": list(
            TokenWindows(path, smollm2.tokenizer_path(), specs, seq_len=length, windows=counts[length])
        )
        for split, path in splits().items()
        for length in (128, 512)
    }
    float_runner = peers.Runner(model)
    nll = {"fp32": {cell: window_nll(float_runner, windows) for cell, windows in grid.items()}}
    rows: dict[str, dict] = {}
    for artifact in args.artifacts:
        runner = peers.Runner(artifact)
        nll[artifact.stem] = {cell: window_nll(runner, windows) for cell, windows in grid.items()}
        rows[artifact.stem] = {
            cell: {
                **relative_drop(
                    nll[artifact.stem][cell], nll["fp32"][cell], len(grid[cell][0]["input_ids"][0]) - 1
                ),
                "windows": len(grid[cell]),
            }
            for cell in grid
        }
        print(artifact.stem, json.dumps(rows[artifact.stem]), file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "budget_context.json").write_text(
        json.dumps({"splits": {k: str(v) for k, v in splits().items()}, "rows": rows}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
