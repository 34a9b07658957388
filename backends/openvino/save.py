"""Writing an `openvino.Model` as ``.xml`` + ``.bin`` atomically.

Both files are written into a temporary folder beside the destination and renamed into place,
the weights first (`qcompiler.io.write_staged`): an interrupted save leaves no half-written pair,
and an input model's files are never written.
"""

from __future__ import annotations

import os
import pathlib

from qcompiler.errors import ModelSaveError
from qcompiler.io import write_staged


def save_openvino(
    model: object,
    path: str | os.PathLike[str],
    *,
    protected: tuple[str | os.PathLike[str], ...] = (),
) -> pathlib.Path:
    """Write `model` (an `openvino.Model`) to `path` (``.xml``) and its ``.bin``; return the path.

    Weights keep their element types (``compress_to_fp16=False``: float constants stay f32; an
    FP16 source's weights are f16 constants -> Convert already, `decompression.restore_decompression`).
    """
    import openvino as ov

    destination = pathlib.Path(path).resolve()
    if destination.suffix != ".xml":
        raise ModelSaveError(f"{destination}: an OpenVINO model is written as .xml (+ .bin)")
    write_staged(
        destination,
        [destination.with_suffix(".bin")],
        lambda staged: ov.save_model(model, str(staged), compress_to_fp16=False),
        {pathlib.Path(p).resolve() for p in protected},
        "could not write the OpenVINO model",
    )
    return destination
