import os

import numpy as np
import onnx_ir as ir
import pytest

from qcompiler import io
from qcompiler.errors import ModelLoadError, ModelSaveError
from tests.graphs import mlp_with_attention_matmul


def test_load_errors_name_the_file(tmp_path):
    """Missing file, folder, garbage bytes and an empty file each fail naming the path."""
    with pytest.raises(ModelLoadError, match="missing.onnx: model file not found"):
        io.load(tmp_path / "missing.onnx")
    with pytest.raises(ModelLoadError, match="is a folder"):
        io.load(tmp_path)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\xfe not a protobuf \x00\x01")
    with pytest.raises(ModelLoadError, match="garbage.onnx: not"):
        io.load(garbage)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty.onnx: not an ONNX model"):
        io.load(empty)


def test_load_accepts_proto_and_ir(tmp_path):
    """Paths, ModelProto and ir.Model all come back as ir.Model; the path is remembered."""
    model = mlp_with_attention_matmul()
    assert io.load(model) is model
    assert isinstance(io.load(ir.to_proto(model)), ir.Model)
    path = io.save(model, tmp_path / "m.onnx")
    loaded = io.load(path)
    assert loaded.meta[io.SOURCE_PATH_KEY] == str(path)
    assert [n.op_type for n in loaded.graph] == [n.op_type for n in model.graph]


def test_save_refuses_to_overwrite_the_source(tmp_path):
    """Saving a loaded model onto its own file is refused and the file is untouched."""
    path = io.save(mlp_with_attention_matmul(), tmp_path / "m.onnx")
    before = path.read_bytes()
    with pytest.raises(ModelSaveError, match="refusing to overwrite"):
        io.save(io.load(path), path)
    assert path.read_bytes() == before


def test_save_is_atomic_and_leaves_no_temporaries(tmp_path):
    """A failed save leaves neither a partial file nor the staging folder."""
    bad = ir.Model(ir.Graph([], [], nodes=[], name="bad"), ir_version=9)
    bad.graph.outputs.append(ir.Value(name="dangling"))
    bad.graph.outputs[0]._type = object()  # noqa: SLF001 - force a serialization failure
    with pytest.raises(ModelSaveError, match="could not serialize"):
        io.save(bad, tmp_path / "out.onnx")
    assert os.listdir(tmp_path) == []


def test_external_data_round_trip_and_lazy_load(tmp_path):
    """external_data=True writes <name>.data beside the model; loading keeps tensors lazy."""
    model = mlp_with_attention_matmul()
    path = io.save(model, tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").exists()
    loaded = io.load(path)
    w1 = loaded.graph.initializers["w1"].const_value
    assert isinstance(w1, ir.ExternalTensor)
    np.testing.assert_array_equal(w1.numpy(), model.graph.initializers["w1"].const_value.numpy())
    assert sorted(os.listdir(tmp_path)) == ["ext.onnx", "ext.onnx.data"]


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    """A location like ../secret is refused at load time, naming the initializer."""
    folder = tmp_path / "model"
    folder.mkdir()
    path = io.save(mlp_with_attention_matmul(), folder / "ext.onnx", external_data=True)
    (tmp_path / "secret.dat").write_bytes((folder / "ext.onnx.data").read_bytes())
    text = path.read_bytes().replace(b"ext.onnx.data", b"../secret.dat")  # same length
    path.write_bytes(text)
    with pytest.raises(ModelLoadError, match="points outside the model folder"):
        io.load(path)


def test_atomic_write_text(tmp_path):
    """Reports are written whole through a rename."""
    target = io.atomic_write_text(tmp_path / "r.json", "{}\n")
    assert target.read_text() == "{}\n" and os.listdir(tmp_path) == ["r.json"]


def test_compiled_model_cannot_be_saved_over_its_input(tmp_path):
    """The API's result remembers its source: qcompiler.save onto the input file is refused."""
    import qcompiler
    from tests.graphs import random_feeds

    path = io.save(mlp_with_attention_matmul(), tmp_path / "m.onnx")
    before = path.read_bytes()
    result = qcompiler.compile(path, "ort-cpu", data=random_feeds(io.load(path)), progress=False)
    with pytest.raises(ModelSaveError, match="refusing to overwrite the input model's file"):
        io.save(result.model, path)
    assert path.read_bytes() == before
    assert io.save(result.model, tmp_path / "out.onnx").exists()


def test_a_lazily_loaded_model_saved_inline_elsewhere_carries_its_weights(tmp_path):
    """Weights still memory-mapped from the input's data file are written into the new model."""
    from tests.graphs import random_feeds, run

    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir()
    model = mlp_with_attention_matmul()
    io.save(model, source, external_data=True)
    loaded = io.load(source)
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in loaded.graph.initializers.values())
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    io.save(loaded, out, external_data=False)
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in loaded.graph.initializers.values())
    (source.parent / "model.onnx.data").rename(tmp_path / "moved.data")  # the input's weights are gone
    feed = random_feeds(model, batches=1)[0]
    for got, expected in zip(run(io.load(out), feed), run(model, feed), strict=True):
        np.testing.assert_array_equal(got, expected)
