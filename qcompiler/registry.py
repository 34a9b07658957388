"""Which backend object runs a target: the one place core names the backends.

A new runtime is a folder under ``backends/`` exposing ``BACKEND`` (a `Backend`), one line in
`_BACKENDS`, and its rows in `qcompiler.targets`. Backends are imported on first use, so a
runtime that is not installed costs nothing until a target needs it.
"""

from __future__ import annotations

import functools
import importlib
import os
import pathlib

from qcompiler.backend import Backend
from qcompiler.errors import OptionError
from qcompiler.targets import Target, get_target

_BACKENDS: dict[str, str] = {
    "onnxruntime": "qcompiler.backends.onnxruntime.backend",
    "openvino": "qcompiler.backends.openvino.backend",
    "tensorrt": "qcompiler.backends.tensorrt.backend",
}
"""`Target.backend` -> the module holding its ``BACKEND``."""


@functools.cache
def backend_named(name: str) -> Backend:
    """The backend object of a `Target.backend` name."""
    if name not in _BACKENDS:
        raise OptionError(f"no backend named {name!r} (known: {', '.join(_BACKENDS)})")
    backend = importlib.import_module(_BACKENDS[name]).BACKEND
    assert isinstance(backend, Backend)
    return backend


def backend_for(target: str | Target) -> Backend:
    """The backend that lowers to, checks and runs `target`."""
    return backend_named(get_target(target).backend)


def backend_for_artifact(path: str | os.PathLike[str]) -> Backend:
    """The backend whose artifacts have `path`'s suffix (``.onnx``: onnxruntime)."""
    suffix = pathlib.Path(path).suffix
    for name in _BACKENDS:
        if backend_named(name).artifact_suffix == suffix:
            return backend_named(name)
    raise OptionError(f"{path}: no runtime reads {suffix or 'files without a suffix'}")
