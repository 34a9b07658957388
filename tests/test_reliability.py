"""Malformed models and data through the CLI: a named one-line error, exit 2, the input untouched, nothing written.

Each case of issue 18's "Why" list is here, as a model built in the test and mutated the way a
user's file would be.
"""

import hashlib
import pathlib
import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qcompiler import io
from qcompiler.cli import main
from tests.graphs import const, mlp_with_attention_matmul

W8A8 = ["--target", "ort-cpu", "--preset", "transformer"]
INT4 = ["--target", "ort-cpu", "--weights", "int4", "--group-size", "0"]


def digests(folder: pathlib.Path) -> dict[str, str]:
    """Every file under `folder` and its hash: the whole state a failed compile must leave as it was."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def calibration(folder: pathlib.Path, poison: float | None = None) -> pathlib.Path:
    """Three .npz batches for the mlp graph; `poison` written into the second one."""
    data = folder / ("calib" if poison is None else f"calib_{poison}")
    data.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        x = rng.standard_normal((2, 6, 8)).astype(np.float32)
        if index == 1 and poison is not None:
            x[1, 2, 3] = poison
        np.savez(data / f"{index}.npz", x=x)
    return data


def fails_cleanly(capsys, folder: pathlib.Path, arguments: list[str], message: str) -> str:
    """Run the CLI; assert exit 2, one stderr line matching `message`, and `folder` exactly as before."""
    before = digests(folder)
    code = main([*arguments, "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("qcompile: error: "), err
    assert re.search(message, err), err
    assert digests(folder) == before
    return err


def saved_proto(folder: pathlib.Path, name: str, edit) -> pathlib.Path:
    """The mlp model as a protobuf, edited by `edit(proto)` the way a broken exporter or disk would."""
    proto = ir.to_proto(mlp_with_attention_matmul())
    edit(proto)
    path = folder / name
    onnx.save(proto, path)
    return path


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("job", [W8A8, INT4], ids=["w8a8", "int4"])
def test_nonfinite_weight_is_named(tmp_path, capsys, value, job):
    """NaN or Inf in a MatMul weight: named with its node and count (it used to compile, exit 0)."""
    model = mlp_with_attention_matmul()
    weight = model.graph.initializers["w2"]
    array = weight.const_value.numpy().copy()
    array[0, :3] = value
    weight.const_value = ir.tensor(array, name="w2")
    path = io.save(model, tmp_path / "nan.onnx")
    what = "NaN" if np.isnan(value) else "Inf"
    fails_cleanly(
        capsys,
        tmp_path,
        [str(path), *job, "--data", str(calibration(tmp_path))],
        rf"nan.onnx: weight 'w2' \(read by MatMul 'fc2'\) holds 3 {what} of 64 values",
    )


def test_infinite_mask_constant_is_allowed(tmp_path):
    """-inf in a constant no weighted op reads (an attention mask's fill) is legitimate."""
    model = mlp_with_attention_matmul()
    graph = model.graph
    mask = const(graph, "mask_fill", np.full((1, 6, 6), -np.inf, np.float32))
    scores = graph.outputs[0]
    masked = ir.node("Min", [scores, mask], name="mask")
    graph.append(masked)
    graph.outputs[0] = masked.outputs[0]
    masked.outputs[0].name = "masked"
    path = io.save(model, tmp_path / "masked.onnx")
    assert main([str(path), *W8A8, "--data", str(calibration(tmp_path)), "-q"]) == 0


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_calibration_batch_is_named(tmp_path, capsys, value):
    """A NaN or Inf in an .npz batch names the file, the input and the first index (it used to compile)."""
    path = io.save(mlp_with_attention_matmul(), tmp_path / "mlp.onnx")
    data = calibration(tmp_path, poison=value)
    fails_cleanly(
        capsys,
        tmp_path,
        [str(path), *W8A8, "--data", str(data)],
        r"1\.npz: input 'x' holds 1 non-finite value\(s\) .*first at index \[1, 2, 3\]",
    )


def test_nonfinite_validation_batch_is_named(tmp_path, capsys):
    """The same check on --val-data, before the float model is measured."""
    path = io.save(mlp_with_attention_matmul(), tmp_path / "mlp.onnx")
    fails_cleanly(
        capsys,
        tmp_path,
        [str(path), *W8A8, "--data", str(calibration(tmp_path)), "--max-drop", "0.01"]
        + ["--val-data", str(calibration(tmp_path, poison=np.nan))],
        r"validation data .*1\.npz: input 'x' holds 1 non-finite",
    )


@pytest.mark.parametrize("job", [W8A8, INT4], ids=["w8a8", "int4"])
def test_truncated_external_data_is_named_before_work(tmp_path, capsys, job):
    """External data shorter than its entries say: the initializer and the byte range (was 'internal error' after calibration)."""
    path = io.save(mlp_with_attention_matmul(), tmp_path / "ext.onnx", external_data=True)
    data = tmp_path / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    fails_cleanly(
        capsys,
        tmp_path,
        [str(path), *job, "--data", str(calibration(tmp_path))],
        r"ext.onnx: initializer '\w+': bytes \d+\.\.\d+ of 'ext.onnx.data' are past its end \(\d+ bytes\)",
    )


def test_cycle_is_named(tmp_path, capsys):
    """A graph with a cycle names the nodes on it (was 'internal error: ValueError: Graph contains a cycle')."""

    def close_loop(proto):
        proto.graph.node[0].input[0] = proto.graph.node[1].output[0]  # fc1 reads relu, relu reads fc1

    path = saved_proto(tmp_path, "cycle.onnx", close_loop)
    fails_cleanly(
        capsys,
        tmp_path,
        [str(path), *W8A8, "--data", str(calibration(tmp_path))],
        r"cycle.onnx: the graph has a cycle: '(fc1|relu)' -> '(fc1|relu)' -> '\1'",
    )


@pytest.mark.parametrize("job", [W8A8, INT4], ids=["w8a8", "int4"])
def test_missing_initializer_is_named(tmp_path, capsys, job):
    """A node reading an initializer that is not there (INT4 used to compile it, W8A8 failed inside)."""

    def drop_w1(proto):
        kept = [t for t in proto.graph.initializer if t.name != "w1"]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)

    path = saved_proto(tmp_path, "missing.onnx", drop_w1)
    fails_cleanly(
        capsys,
        tmp_path,
        [str(path), *job, "--data", str(calibration(tmp_path))],
        r"missing.onnx: node 'fc1' \(MatMul\) reads 'w1', which no graph input, initializer or node defines",
    )


def test_undefined_graph_output_is_named(tmp_path, capsys):
    """A graph output nothing produces."""

    def dangling(proto):
        proto.graph.output[1].name = "nowhere"

    path = saved_proto(tmp_path, "dangling.onnx", dangling)
    fails_cleanly(
        capsys,
        tmp_path,
        [str(path), *W8A8, "--data", str(calibration(tmp_path))],
        r"graph output 'nowhere', which no graph input, initializer or node defines",
    )


@pytest.mark.parametrize("target", ["ort-cpu", "openvino-cpu", "tensorrt"])
def test_unknown_op_is_refused_before_work(tmp_path, capsys, target, monkeypatch):
    """An op of an unknown domain fails when the model is read, not as the artifact's legality failure."""
    from qcompiler import calibration as calibration_module

    def unknown_relu(proto):
        proto.graph.node[1].domain = "com.example"
        proto.opset_import.add(domain="com.example", version=1)

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration started")

    monkeypatch.setattr(calibration_module, "stream", no_calibration)
    path = saved_proto(tmp_path, "unknown.onnx", unknown_relu)
    fails_cleanly(
        capsys,
        tmp_path,
        [str(path), "--target", target, "--preset", "transformer", "--data", str(calibration(tmp_path))],
        rf"unknown.onnx: node 'relu' is com.example.Relu, an op the runtime of {target} does not have",
    )


def test_contrib_ops_are_known_to_onnxruntime(tmp_path):
    """com.microsoft ops onnxruntime has kernels for pass the check (FastGelu in optimized BERT exports)."""
    from qcompiler.registry import backend_for

    model = mlp_with_attention_matmul()
    relu = next(node for node in model.graph if node.op_type == "Relu")
    gelu = ir.node("FastGelu", [relu.inputs[0]], domain="com.microsoft", name="gelu")
    model.graph.insert_after(relu, gelu)
    model.opset_imports["com.microsoft"] = 1
    assert backend_for("ort-cpu").unknown_ops(model) == []
    assert [node.name for node in backend_for("tensorrt").unknown_ops(model)] == ["gelu"]


def test_internal_error_names_stage_and_node(tmp_path, capsys, monkeypatch):
    """A bug is one line with the stage and the node it was working on, exit 1, no traceback."""
    from qcompiler.rewrites import qdq

    def broken(self, graph, unit):
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(qdq.InsertQDQPass, "_quantize_weight", broken)
    path = io.save(mlp_with_attention_matmul(), tmp_path / "mlp.onnx")
    before = digests(tmp_path)
    assert main([str(path), *W8A8, "--data", str(calibration(tmp_path)), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "qcompile: internal error in stage 'quantize' at node 'fc1': ValueError: boom "
        "(a bug: rerun with --debug for the traceback and report it)"
    )
    assert digests(tmp_path) == {**before, **{k: v for k, v in digests(tmp_path).items() if "calib" in k}}


def test_pass_errors_are_unwrapped_to_their_cause(tmp_path, capsys, monkeypatch):
    """onnx_ir's PassError names pass objects by repr: the line shows the pass's own error instead."""
    from qcompiler.rewrites import normalize

    def broken(self, model):
        raise RuntimeError("the real cause")

    monkeypatch.setattr(normalize.NormalizePass, "call", broken)
    path = io.save(mlp_with_attention_matmul(), tmp_path / "mlp.onnx")
    assert main([str(path), *W8A8, "--data", str(calibration(tmp_path)), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert "stage 'normalize'" in err and "RuntimeError: the real cause" in err and "object at 0x" not in err
