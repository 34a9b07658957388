"""Calibration and validation data: where feeds come from and how they are checked.

A data source is any iterable of feed dicts (input name -> numpy array, one batch each). Sources
here read a folder of ``.npz`` files, tokenize a text file, or (only when asked) make random
inputs. `InputSpec.check` validates every batch against the model's inputs before any work, so a
wrong name, dtype or rank fails with the input's name, not deep inside onnxruntime.
"""

from __future__ import annotations

import dataclasses
import pathlib
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qcompiler.errors import DataError

Feed = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A model input as data must match it: name, element type and shape (None = dynamic)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None

    @classmethod
    def from_value(cls, value: ir.Value) -> InputSpec:
        """Describe a graph input."""
        if value.dtype is None or value.dtype == ir.DataType.UNDEFINED:
            raise DataError(f"model input {value.name!r} has no element type")
        try:
            dtype = value.dtype.numpy()
        except TypeError as exc:
            raise DataError(
                f"model input {value.name!r} has element type {value.dtype.name}, which no array holds"
            ) from exc
        shape = None
        if value.shape is not None:
            # a non-positive size (-1 from Paddle2ONNX and other exporters) means a dynamic axis
            shape = tuple(dim if isinstance(dim, int) and dim > 0 else None for dim in value.shape)
        return cls(str(value.name), dtype, shape)

    def check(self, array: np.ndarray, where: str) -> None:
        """Raise `DataError` naming the input and `where` if `array` does not fit."""
        if array.dtype != self.dtype and not (is_float_dtype(array.dtype) and is_float_dtype(self.dtype)):
            raise DataError(
                f"{where}: input {self.name!r} has dtype {array.dtype}, the model expects {self.dtype}"
            )
        if self.shape is None:
            return
        if array.ndim != len(self.shape):
            raise DataError(
                f"{where}: input {self.name!r} has rank {array.ndim} (shape {list(array.shape)}), "
                f"the model expects rank {len(self.shape)}"
            )
        for axis, (got, expected) in enumerate(zip(array.shape, self.shape, strict=True)):
            if expected is not None and got != expected:
                raise DataError(
                    f"{where}: input {self.name!r} has size {got} on axis {axis}, "
                    f"the model expects {expected}"
                )


def _require_finite(array: np.ndarray, name: str, where: str) -> None:
    """A NaN or Inf in a batch would poison every range and statistic it reaches: refuse it by name."""
    if not is_float_dtype(array.dtype):
        return
    finite = np.isfinite(array)
    if finite.all():
        return
    bad = array.size - int(np.count_nonzero(finite))
    first = tuple(int(i) for i in np.argwhere(~finite)[0])
    raise DataError(
        f"{where}: input {name!r} holds {bad} non-finite value(s) (NaN or Inf; first at index {list(first)}, "
        f"{array[first]})"
    )


def is_float_dtype(dtype: np.dtype) -> bool:
    """Whether arrays of `dtype` hold floats (numpy's float types or ml_dtypes' bfloat16)."""
    return dtype.kind == "f" or dtype == ml_dtypes.bfloat16


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The specs of the model's real inputs (initializers listed as inputs are excluded)."""
    return [InputSpec.from_value(v) for v in model.graph.inputs if not v.is_initializer()]


def check_feed(feed: Mapping[str, np.ndarray], specs: Sequence[InputSpec], where: str) -> Feed:
    """Validate one batch: exactly the model's inputs, each of the right dtype and rank."""
    if not isinstance(feed, Mapping):
        raise DataError(f"{where}: a batch must be a dict of input name -> array, got {type(feed)}")
    expected = {spec.name for spec in specs}
    unknown = sorted(set(feed) - expected)
    if unknown:
        raise DataError(
            f"{where}: unknown input name(s) {unknown}; the model's inputs are {sorted(expected)}"
        )
    missing = sorted(expected - set(feed))
    if missing:
        raise DataError(f"{where}: missing input(s) {missing}")
    checked: Feed = {}
    for spec in specs:
        array = np.asarray(feed[spec.name])
        spec.check(array, where)
        _require_finite(array, spec.name, where)
        # float data for a float input of another precision (FP32 .npz for an FP16 model): converted
        checked[spec.name] = array if array.dtype == spec.dtype else array.astype(spec.dtype)
    return checked


class NpzFolder:
    """A folder of ``.npz`` files, one batch per file, keys = model input names."""

    synthetic = False

    def __init__(self, folder: str | pathlib.Path) -> None:
        self.folder = pathlib.Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"--data {self.folder}: not a folder")
        self.files = sorted(self.folder.glob("*.npz"))
        if not self.files:
            raise DataError(f"--data {self.folder}: no .npz files in the folder")
        self.description = f"{len(self.files)} .npz batches from {self.folder}"

    def batch_name(self, index: int) -> str:
        """The file batch `index` comes from (error messages name it)."""
        return str(self.files[index])

    def __iter__(self) -> Iterator[Feed]:
        for file in self.files:
            yield read_npz(file)


def read_npz(file: pathlib.Path) -> Feed:
    """One batch: the arrays of an ``.npz`` archive (no pickled objects); anything else names the file."""
    try:
        loaded = np.load(file, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{file}: a single .npy array, not an .npz archive of named arrays")
        with loaded as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{file}: not a readable .npz of arrays ({exc})") from exc


class FeedIterable:
    """Wraps a user's iterable of feed dicts (the Python API's data argument)."""

    synthetic = False

    def __init__(self, feeds: Iterable[Mapping[str, np.ndarray]], description: str = "") -> None:
        self.feeds = feeds
        self.description = description or "feeds from a Python iterable"

    def __iter__(self) -> Iterator[Feed]:
        for feed in self.feeds:
            yield dict(feed)


def load_tokenizer(path: str | pathlib.Path):  # -> tokenizers.Tokenizer
    """Load a Hugging Face `tokenizers` tokenizer from ``tokenizer.json`` or a folder holding it."""
    from tokenizers import Tokenizer

    file = pathlib.Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise DataError(f"--tokenizer {path}: no tokenizer.json found")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:
        raise DataError(f"--tokenizer {file}: not a tokenizers JSON file ({exc})") from exc


def read_text_lines(path: str | pathlib.Path, limit: int | None = None) -> list[str]:
    """Non-empty lines (one sample each) of a UTF-8 text file, at most `limit`."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise DataError(f"--text {file}: file not found")
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise DataError(f"--text {file}: not UTF-8 text ({exc})") from exc
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"--text {file}: no non-empty lines")
    return lines[:limit] if limit else lines


TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
"""The model inputs text data can fill, by name."""


def _require_text_inputs(specs: Sequence[InputSpec]) -> list[InputSpec]:
    unknown = [spec.name for spec in specs if spec.name not in TEXT_INPUTS]
    if unknown:
        raise DataError(
            f"--text cannot fill model input(s) {unknown}; text data fills only "
            f"{list(TEXT_INPUTS)} (use --data with .npz files instead)"
        )
    return list(specs)


def _token_feed(specs: Sequence[InputSpec], ids: np.ndarray, mask: np.ndarray, type_ids: np.ndarray) -> Feed:
    """The feed for token batches: each model input by name, in the model's dtype."""
    columns = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": type_ids,
        "position_ids": np.maximum(np.cumsum(mask, axis=1) - 1, 0),
    }
    return {spec.name: columns[spec.name].astype(spec.dtype) for spec in specs}


class TextSource:
    """Tokenized lines of a text file (or a list of strings), batched and padded per batch.

    Each batch is padded to its longest line. Model inputs are filled by name: ``input_ids``, ``attention_mask``, ``token_type_ids`` and
    ``position_ids``; any other input is an error that names it.
    """

    synthetic = False

    def __init__(
        self,
        text: str | pathlib.Path | list[str],
        tokenizer: str | pathlib.Path,
        specs: Sequence[InputSpec],
        *,
        seq_len: int = 128,
        samples: int | None = 300,
        batch_size: int = 8,
    ) -> None:
        if seq_len < 2 or batch_size < 1:
            raise DataError(f"--seq-len must be >= 2 and --batch-size >= 1 ({seq_len}, {batch_size})")
        self.specs = _require_text_inputs(specs)
        if isinstance(text, list):
            self.lines = text[:samples] if samples else list(text)
            origin = "a list"
        else:
            self.lines = read_text_lines(text, samples)
            origin = pathlib.Path(text).name
        self.tokenizer = load_tokenizer(tokenizer)
        self.tokenizer.enable_truncation(max_length=seq_len)
        pad_id = self.tokenizer.token_to_id("[PAD]") or 0
        self.tokenizer.enable_padding(pad_id=pad_id)
        self.batch_size = batch_size
        self.description = f"{len(self.lines)} lines of {origin}, seq_len <= {seq_len}, batch {batch_size}"

    def __len__(self) -> int:
        return -(-len(self.lines) // self.batch_size)

    def __iter__(self) -> Iterator[Feed]:
        for start in range(0, len(self.lines), self.batch_size):
            encodings = self.tokenizer.encode_batch(self.lines[start : start + self.batch_size])
            ids = np.array([e.ids for e in encodings])
            mask = np.array([e.attention_mask for e in encodings])
            yield _token_feed(self.specs, ids, mask, np.array([e.type_ids for e in encodings]))


class TokenWindows:
    """A text file tokenized as one stream and cut into non-overlapping windows (causal LMs).

    Lines are joined with blank lines between them, as paragraphs. Each batch is `batch_size`
    windows of exactly `seq_len` tokens; ``attention_mask`` is all ones and ``position_ids`` count
    from 0. Used for LLM calibration and for perplexity.
    """

    synthetic = False

    def __init__(
        self,
        text: str | pathlib.Path,
        tokenizer: str | pathlib.Path,
        specs: Sequence[InputSpec],
        *,
        seq_len: int = 512,
        windows: int | None = None,
        batch_size: int = 1,
    ) -> None:
        self.specs = _require_text_inputs(specs)
        ids = load_tokenizer(tokenizer).encode("\n\n".join(read_text_lines(text))).ids
        count = len(ids) // seq_len if windows is None else min(windows, len(ids) // seq_len)
        if count == 0:
            raise DataError(f"--text {text}: fewer than {seq_len} tokens")
        self.tokens = np.array(ids[: count * seq_len]).reshape(count, seq_len)
        self.batch_size = batch_size
        self.description = f"{count} windows of {seq_len} tokens from {pathlib.Path(text).name}"

    def __len__(self) -> int:
        return -(-len(self.tokens) // self.batch_size)

    def __iter__(self) -> Iterator[Feed]:
        for start in range(0, len(self.tokens), self.batch_size):
            ids = self.tokens[start : start + self.batch_size]
            yield _token_feed(self.specs, ids, np.ones_like(ids), np.zeros_like(ids))


class SyntheticSource:
    """Random inputs, only when the user passed ``--synthetic``; the report flags it."""

    synthetic = True

    def __init__(
        self, specs: Sequence[InputSpec], *, batches: int = 8, dynamic_size: int = 8, seed: int = 0
    ) -> None:
        self.specs = list(specs)
        self.batches = batches
        self.dynamic_size = dynamic_size
        self.seed = seed
        self.description = f"{batches} batches of random inputs (synthetic)"

    def __iter__(self) -> Iterator[Feed]:
        rng = np.random.default_rng(self.seed)
        for _ in range(self.batches):
            feed: Feed = {}
            for spec in self.specs:
                shape = tuple(d if d is not None else self.dynamic_size for d in spec.shape or ())
                if spec.name == "attention_mask":
                    feed[spec.name] = np.ones(shape, dtype=spec.dtype)
                elif np.issubdtype(spec.dtype, np.integer):
                    high = 2 if spec.name == "token_type_ids" else 1000
                    feed[spec.name] = rng.integers(0, high, shape).astype(spec.dtype)
                elif spec.dtype == np.bool_:
                    feed[spec.name] = rng.integers(0, 2, shape).astype(np.bool_)
                else:
                    feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            yield feed


def validated(
    source: Iterable[Mapping[str, np.ndarray]],
    specs: Sequence[InputSpec],
    name: str,
    limit: int | None = None,
) -> Iterator[Feed]:
    """Yield checked batches of `source` (at most `limit`); an empty source is an error."""
    count = 0
    namer = getattr(source, "batch_name", None)
    for count, feed in enumerate(source, start=1):
        where = f"{name} {namer(count - 1)}" if namer else f"{name} batch {count}"
        yield check_feed(feed, specs, where)
        if limit is not None and count >= limit:
            return
    if count == 0:
        raise DataError(f"{name}: the data source yielded no batches")


def peek_check(source: Iterable[Mapping[str, np.ndarray]], specs: Sequence[InputSpec], name: str) -> None:
    """Check the first batch now, before any expensive work starts."""
    for _ in validated(source, specs, name, limit=1):
        return
