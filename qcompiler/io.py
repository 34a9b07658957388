"""Loading models into the IR and saving them atomically.

Loading keeps large initializers lazy (onnx_ir external tensors memory-map their file), so models
over 2 GB load without reading their weights. Saving writes into a temporary folder beside the
destination and renames the finished files into place: a failed or interrupted save never leaves a
half-written model, and the input model's files are never written.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator

import onnx
import onnx_ir as ir

from qcompiler.errors import ModelLoadError, ModelSaveError
from qcompiler.frontends import openvino_ir


class SourceFormat(enum.Enum):
    """What a model was read from; an OpenVINO IR model keeps OpenVINO ops and runs in OpenVINO only."""

    ONNX = "onnx"
    OPENVINO_IR = "openvino-ir"


def source_format(model: ir.Model) -> SourceFormat:
    """The format `load` stamped on `model` (read from the graph for a model built in memory or cloned)."""
    stamped = model.meta.get(SOURCE_FORMAT_KEY)
    if stamped is not None:
        return SourceFormat(stamped)
    return SourceFormat.OPENVINO_IR if openvino_ir.is_openvino_dialect(model) else SourceFormat.ONNX


def clone(model: ir.Model) -> ir.Model:
    """A deep copy of `model` that keeps its `meta` (source path and format: `clone` alone drops them)."""
    copy = model.clone()
    copy.meta.update(model.meta)
    return copy


SOURCE_PATH_KEY = "qcompiler.source_path"
"""`ir.Model.meta` key holding the file a model was loaded from (used to refuse overwriting it).

`compile` carries it over to the compiled model, so saving a result onto its input is refused
for API users as well as for the CLI."""

SOURCE_FORMAT_KEY = "qcompiler.source_format"
"""`ir.Model.meta` key holding the format the model was read from (`SourceFormat`), stamped once by `load`."""

EXTERNAL_DATA_THRESHOLD = 1_800_000_000
"""Initializer bytes above which `save` writes external data by itself (protobuf's limit is 2 GB)."""


def load(model: str | os.PathLike[str] | onnx.ModelProto | ir.Model) -> ir.Model:
    """Return `model` as an `onnx_ir.Model`, loading it from disk when given a path.

    An `ir.Model` is returned as is (callers that modify it clone first); a `ModelProto` is
    converted. Errors name the file.
    """
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.from_proto(model)
    path = pathlib.Path(model)
    if not path.exists():
        raise ModelLoadError(f"{path}: model file not found")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a folder, expected an .onnx file")
    return _READERS.get(path.suffix, _load_onnx)(path)


def _load_onnx(path: pathlib.Path) -> ir.Model:
    """An ``.onnx`` file; external data stays lazy and must live inside the model's folder."""
    try:
        # onnx_ir warns of a name no scope defines and makes a placeholder for it: validation
        # (`model_validation.undefined_inputs`) names the node in a one-line error instead
        with _quiet(logging.getLogger("onnx_ir.serde")):
            loaded = ir.load(path)
    except Exception as exc:  # protobuf raises several unrelated types for garbage input
        raise ModelLoadError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    if loaded.ir_version == 0 or not loaded.graph.outputs:
        raise ModelLoadError(f"{path}: not an ONNX model (no IR version or no graph outputs)")
    _check_external_data(loaded, path)
    loaded.meta[SOURCE_PATH_KEY] = str(path.resolve())
    loaded.meta[SOURCE_FORMAT_KEY] = SourceFormat.ONNX.value
    return loaded


def _load_openvino_ir(path: pathlib.Path) -> ir.Model:
    """OpenVINO IR (``.xml`` + ``.bin``) in the OpenVINO dialect, its MatMul / Mul / Add / Gather as ONNX ops."""
    if not path.with_suffix(".bin").exists():
        raise ModelLoadError(f"{path}: its weights file {path.with_suffix('.bin').name} is missing")
    loaded = openvino_ir.read_openvino_ir(path)
    loaded.meta[SOURCE_PATH_KEY] = str(path.resolve())
    loaded.meta[SOURCE_FORMAT_KEY] = SourceFormat.OPENVINO_IR.value
    return loaded


_READERS: dict[str, Callable[[pathlib.Path], ir.Model]] = {".xml": _load_openvino_ir}
"""Frontends by file suffix; anything else is read as ONNX."""


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """Silence `logger` below errors for the block."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_external_data(model: ir.Model, path: pathlib.Path) -> None:
    """External data must be inside the model's folder (not ``../../etc``), present, and as long as its entries say."""
    folder = path.resolve().parent
    sizes: dict[pathlib.Path, int] = {}
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if not isinstance(tensor, ir.ExternalTensor):
                continue
            location = (folder / tensor.location).resolve()
            where = f"{path}: initializer {value.name!r}"
            if folder not in location.parents:
                raise ModelLoadError(f"{where} points outside the model folder ({tensor.location!r})")
            if location not in sizes:
                if not location.is_file():
                    raise ModelLoadError(
                        f"{path}: external data file {tensor.location!r} of {value.name!r} is missing"
                    )
                sizes[location] = location.stat().st_size
            offset = tensor.offset or 0
            length = tensor.length if tensor.length is not None else tensor.nbytes
            if length != tensor.nbytes:
                raise ModelLoadError(
                    f"{where}: its external data entry says {length} bytes, its type and shape need {tensor.nbytes}"
                )
            if offset < 0 or offset + length > sizes[location]:
                raise ModelLoadError(
                    f"{where}: bytes {offset}..{offset + length} of {tensor.location!r} are past its end "
                    f"({sizes[location]} bytes): the data file is truncated or not this model's"
                )


def initializer_bytes(model: ir.Model) -> int:
    """Total bytes of all initializers (without loading lazy ones)."""
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += tensor.nbytes
    return total


def save(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    protected: tuple[str | os.PathLike[str], ...] = (),
) -> pathlib.Path:
    """Write `model` to `path` atomically; return the path.

    Args:
        model: the model to write.
        path: destination ``.onnx`` file.
        external_data: True writes weights to ``<name>.data`` beside the model, False inlines them,
            None decides by size (above ~1.8 GB external).
        protected: files that must not be written (the input model); the file the model was
            loaded from is always protected.
    """
    destination = pathlib.Path(path).resolve()
    data_name = destination.name + ".data"
    guarded = {pathlib.Path(p).resolve() for p in protected}
    source = model.meta.get(SOURCE_PATH_KEY)
    if source:
        guarded.add(pathlib.Path(source))
        guarded.update(_external_files(model, pathlib.Path(source).parent))
    if external_data is None:
        external_data = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if not external_data and any(
        isinstance(value.const_value, ir.ExternalTensor) for value in model.graph.initializers.values()
    ):
        # onnx_ir writes a lazy tensor as a reference to its file, relative to the new model:
        # read them in (on a clone, so the caller's model stays lazy)
        model = ir.external_data.load_to_model(model.clone())
    companions = [destination.parent / data_name] if external_data else []
    write_staged(
        destination,
        companions,
        lambda staged: ir.save(model, staged, external_data=data_name if external_data else None),
        guarded,
        "could not serialize the model",
    )
    return destination


def write_staged(
    destination: pathlib.Path,
    companions: list[pathlib.Path],
    write: Callable[[pathlib.Path], object],
    guarded: set[pathlib.Path],
    failure: str,
) -> None:
    """Write `destination` and its companion files (weights) atomically.

    `write(staged)` writes the files into a temporary folder beside the destination, under the
    destination's and the companions' names; the companions are renamed into place first, the
    destination last. Refuses any path in `guarded` (the input model's files). Whatever stops it
    (an error, a full disk, an interrupt) removes the temporary folder and any companion already
    renamed, so no half of an artifact is left behind.
    """
    for target in (destination, *companions):
        if target in guarded:
            raise ModelSaveError(f"{target}: refusing to overwrite the input model's file")
    if not destination.parent.is_dir():
        raise ModelSaveError(f"{destination}: output folder {destination.parent} does not exist")
    try:
        staging = pathlib.Path(tempfile.mkdtemp(prefix=".qcompile-", dir=destination.parent))
    except OSError as exc:
        raise ModelSaveError(
            f"{destination}: {failure}: {describe_os_error(exc, destination.parent)}"
        ) from exc
    placed: list[pathlib.Path] = []
    try:
        staged = staging / destination.name
        try:
            write(staged)
            for companion in companions:
                os.replace(staging / companion.name, companion)
                placed.append(companion)
            os.replace(staged, destination)
        except Exception as exc:
            raise ModelSaveError(
                f"{destination}: {failure}: {describe_os_error(exc, destination.parent)}"
            ) from exc
    except BaseException:
        for companion in placed:
            companion.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def describe_os_error(exc: BaseException, folder: pathlib.Path) -> str:
    """`exc` in one line; a full disk says so, with the space left in `folder`."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MB free"
        except OSError:
            free = "free space unknown"
        return f"no space left on the device of {folder} ({free}); nothing was written"
    return str(exc) or type(exc).__name__


def _external_files(model: ir.Model, folder: pathlib.Path) -> set[pathlib.Path]:
    files = set()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            files.add((folder / tensor.location).resolve())
    return files


def atomic_write_text(path: str | os.PathLike[str], text: str) -> pathlib.Path:
    """Write a text file (a report) through a temporary file and a rename."""
    destination = pathlib.Path(path).resolve()
    if not destination.parent.is_dir():
        raise ModelSaveError(f"{destination}: folder {destination.parent} does not exist")
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(prefix=".qcompile-", dir=destination.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; a report is an ordinary file
        os.replace(temporary, destination)
    except BaseException as exc:
        if temporary is not None:
            pathlib.Path(temporary).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ModelSaveError(f"{destination}: {describe_os_error(exc, destination.parent)}") from exc
        raise
    return destination


IN_MEMORY_LIMIT = 256 * 2**20
"""Above this many weight bytes a runtime gets the model as a temporary file with external data:
serializing to bytes would hold the proto and its bytes in memory at once (2x the weights)."""


@contextlib.contextmanager
def runtime_source(model: ir.Model) -> Iterator[bytes | str]:
    """`model` as a runtime session reads it: serialized bytes, or a temporary file for large models.

    Lazy external tensors of a small model are read in (on a clone; the caller's model stays
    lazy), since a runtime resolves external data of an in-memory model against its own working
    folder. The temporary folder is removed when the block ends (sessions read the file at once).
    """
    if initializer_bytes(model) < IN_MEMORY_LIMIT:
        if any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()):
            model = ir.external_data.load_to_model(model.clone())
        yield ir.to_proto(model).SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="qcompile-session-") as folder:
        yield str(save(model, pathlib.Path(folder) / "model.onnx", external_data=True))
