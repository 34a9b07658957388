import numpy as np
import pytest

from qcompiler.data import (
    FeedIterable,
    InputSpec,
    NpzFolder,
    SyntheticSource,
    TextSource,
    check_feed,
    input_specs,
    validated,
)
from qcompiler.errors import DataError
from tests.graphs import mlp_with_attention_matmul

SPECS = [
    InputSpec("input_ids", np.dtype(np.int64), (None, None)),
    InputSpec("attention_mask", np.dtype(np.int64), (None, None)),
]


def test_check_feed_names_the_culprit():
    """Unknown, missing, wrong dtype, wrong rank and wrong static size each name the input."""
    good = {"input_ids": np.ones((2, 4), np.int64), "attention_mask": np.ones((2, 4), np.int64)}
    assert set(check_feed(good, SPECS, "b")) == {"input_ids", "attention_mask"}
    with pytest.raises(DataError, match=r"b: unknown input name\(s\) \['ids'\]"):
        check_feed({**good, "ids": good["input_ids"]}, SPECS, "b")
    with pytest.raises(DataError, match=r"missing input\(s\) \['attention_mask'\]"):
        check_feed({"input_ids": good["input_ids"]}, SPECS, "b")
    with pytest.raises(DataError, match="'input_ids' has dtype int32"):
        check_feed({**good, "input_ids": np.ones((2, 4), np.int32)}, SPECS, "b")
    with pytest.raises(DataError, match="'attention_mask' has rank 1"):
        check_feed({**good, "attention_mask": np.ones(4, np.int64)}, SPECS, "b")
    static = [InputSpec("x", np.dtype(np.float32), (None, 6, 8))]
    with pytest.raises(DataError, match="'x' has size 7 on axis 1, the model expects 6"):
        check_feed({"x": np.zeros((1, 7, 8), np.float32)}, static, "b")


def test_input_specs_from_model():
    """Specs come from the graph inputs with dynamic dims as None."""
    assert input_specs(mlp_with_attention_matmul()) == [InputSpec("x", np.dtype(np.float32), (None, 6, 8))]


def test_npz_folder_reads_batches_and_names_bad_files(tmp_path):
    """Batches load in name order; a pickled object array is refused (allow_pickle=False) naming the file."""
    np.savez(tmp_path / "b0.npz", x=np.zeros((1, 6, 8), np.float32))
    np.savez(tmp_path / "b1.npz", x=np.ones((1, 6, 8), np.float32))
    batches = list(NpzFolder(tmp_path))
    assert [float(b["x"].mean()) for b in batches] == [0.0, 1.0]
    np.savez(tmp_path / "b2.npz", x=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(DataError, match="b2.npz: not a readable .npz"):
        list(NpzFolder(tmp_path))
    with pytest.raises(DataError, match="b0.npz: not a folder"):
        NpzFolder(tmp_path / "b0.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .npz files"):
        NpzFolder(tmp_path / "empty")


def test_npz_errors_name_the_file_in_validation(tmp_path):
    """A wrong input name in one file is reported with that file's path."""
    np.savez(tmp_path / "a.npz", y=np.zeros((1, 6, 8), np.float32))
    specs = input_specs(mlp_with_attention_matmul())
    with pytest.raises(DataError, match=r"a\.npz: unknown input name"):
        list(validated(NpzFolder(tmp_path), specs, "calibration data"))


def test_validated_rejects_empty_source_and_respects_limit():
    """An empty source is an error; limit stops early."""
    specs = input_specs(mlp_with_attention_matmul())
    with pytest.raises(DataError, match="yielded no batches"):
        list(validated(FeedIterable([]), specs, "data"))
    feeds = [{"x": np.zeros((1, 6, 8), np.float32)}] * 5
    assert len(list(validated(feeds, specs, "data", limit=2))) == 2


def test_text_source_fills_inputs_by_name(tmp_path, tokenizer_json):
    """Lines are tokenized, padded per batch, and mapped onto the model's inputs with its dtype."""
    text = tmp_path / "t.txt"
    text.write_text("hello world\n\nthe quick brown fox jumps\nabc\n", encoding="utf-8")
    source = TextSource(text, tokenizer_json, SPECS, seq_len=6, samples=10, batch_size=2)
    batches = list(source)
    assert len(batches) == len(source) == 2
    first = batches[0]
    assert set(first) == {"input_ids", "attention_mask"} and first["input_ids"].dtype == np.int64
    assert first["input_ids"].shape[1] <= 6
    assert first["attention_mask"][0].sum() < first["attention_mask"][1].sum()  # padding marked


def test_text_source_refuses_inputs_it_cannot_fill(tmp_path, tokenizer_json):
    """A model input that text cannot provide is named."""
    text = tmp_path / "t.txt"
    text.write_text("hello\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"cannot fill model input\(s\) \['pixel_values'\]"):
        TextSource(text, tokenizer_json, [InputSpec("pixel_values", np.dtype(np.float32), None)])
    with pytest.raises(DataError, match="--text .*missing.txt: file not found"):
        TextSource(tmp_path / "missing.txt", tokenizer_json, SPECS)
    with pytest.raises(DataError, match="--tokenizer .*: no tokenizer.json found"):
        TextSource(text, tmp_path, SPECS)


def test_synthetic_source_matches_specs():
    """Synthetic batches have the right dtypes and shapes and are flagged synthetic."""
    source = SyntheticSource(SPECS, batches=2)
    batches = list(source)
    assert source.synthetic and len(batches) == 2
    assert batches[0]["attention_mask"].min() == 1 and batches[0]["input_ids"].dtype == np.int64


def test_token_windows_cut_one_stream(tmp_path, tokenizer_json):
    """Windows are consecutive, exactly seq_len long, with ones as mask and 0..T-1 positions."""
    from qcompiler.data import TokenWindows

    text = tmp_path / "t.txt"
    text.write_text("hello world the quick\nbrown fox jumps abc hello\n", encoding="utf-8")
    specs = SPECS + [InputSpec("position_ids", np.dtype(np.int64), (None, None))]
    source = TokenWindows(text, tokenizer_json, specs, seq_len=3, batch_size=2)
    batches = list(source)
    assert len(source) == 2 and batches[0]["input_ids"].shape == (2, 3)
    assert batches[0]["attention_mask"].min() == 1
    np.testing.assert_array_equal(batches[0]["position_ids"][1], [0, 1, 2])
    with pytest.raises(DataError, match="fewer than 64 tokens"):
        TokenWindows(text, tokenizer_json, SPECS, seq_len=64)
