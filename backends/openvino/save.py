"""Writing an `openvino.Model` as ``.xml`` + ``.bin`` atomically.

Both files are written into a temporary folder beside the destination and renamed into place,
the weights first: an interrupted save leaves no half-written pair, and an input model's files are
never written.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

from qcompiler.errors import ModelSaveError


def save_openvino(
    model: object, path: str | os.PathLike[str], *, protected: tuple[str | os.PathLike[str], ...] = ()
) -> pathlib.Path:
    """Write `model` (an `openvino.Model`) to `path` (``.xml``) and its ``.bin``; return the path.

    Weights keep their element types (``compress_to_fp16=False``: float constants stay f32).
    """
    import openvino as ov

    destination = pathlib.Path(path).resolve()
    if destination.suffix != ".xml":
        raise ModelSaveError(f"{destination}: an OpenVINO model is written as .xml (+ .bin)")
    weights = destination.with_suffix(".bin")
    guarded = {pathlib.Path(p).resolve() for p in protected}
    for target in (destination, weights):
        if target in guarded:
            raise ModelSaveError(f"{target}: refusing to overwrite the input model's file")
    if not destination.parent.is_dir():
        raise ModelSaveError(f"{destination}: output folder {destination.parent} does not exist")
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".qcompile-", dir=destination.parent))
    try:
        staged = staging / destination.name
        try:
            ov.save_model(model, str(staged), compress_to_fp16=False)
        except Exception as exc:
            raise ModelSaveError(f"{destination}: could not write the OpenVINO model: {exc}") from exc
        os.replace(staged.with_suffix(".bin"), weights)
        os.replace(staged, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination
