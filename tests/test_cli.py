import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from qcompiler import io
from qcompiler.cli import main
from tests.graphs import gemm_conv_model, mlp_with_attention_matmul


@pytest.fixture()
def workspace(tmp_path):
    """A tiny model on disk, a folder of .npz batches for it, and the model's original hash."""
    model = io.save(mlp_with_attention_matmul(), tmp_path / "mlp.onnx")
    data = tmp_path / "calib"
    data.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        np.savez(data / f"{index}.npz", x=rng.standard_normal((2, 6, 8)).astype(np.float32))
    return tmp_path, model, data, hashlib.sha256(model.read_bytes()).hexdigest()


def _unchanged(model, digest):
    return hashlib.sha256(model.read_bytes()).hexdigest() == digest


def test_compile_writes_model_and_report_beside_the_input(workspace, capsys):
    """Default output <stem>.<target>.onnx, report <stem>.<target>.report.json; input untouched."""
    folder, model, data, digest = workspace
    assert (
        main([str(model), "--target", "ort-cpu", "--data", str(data), "--preset", "transformer", "-q"]) == 0
    )
    output = folder / "mlp.ort-cpu.onnx"
    report = json.loads((folder / "mlp.ort-cpu.report.json").read_text())
    assert report["nodes"]["quantized"] == 3 and report["fusion"]["fused"] == 3
    assert report["data"]["synthetic"] is False and report["data"]["batches"] == 3
    assert report["size_bytes"]["after"] < report["size_bytes"]["before"]
    assert set(report["run"]["versions"]) >= {"onnxruntime", "onnx-ir", "qcompiler"}
    loaded = io.load(output)
    assert sum(node.op_type == "QuantizeLinear" for node in loaded.graph) == 2
    assert loaded.metadata_props["qcompiler.target"] == "ort-cpu"
    assert _unchanged(model, digest)
    assert sorted(p.name for p in folder.iterdir()) == [
        "calib",
        "mlp.onnx",
        "mlp.ort-cpu.onnx",
        "mlp.ort-cpu.report.json",
    ]


def test_ignore_and_explicit_output(workspace):
    """--ignore REGEX keeps matching nodes float; -o/--report choose the paths."""
    folder, model, data, _ = workspace
    out = folder / "custom.onnx"
    assert (
        main(
            [
                str(model),
                "--target",
                "ort-cpu",
                "--data",
                str(data),
                "--preset",
                "transformer",
                "--ignore",
                "fc[23]",
                "-o",
                str(out),
                "--report",
                str(folder / "r.json"),
                "-q",
            ]
        )
        == 0
    )
    report = json.loads((folder / "r.json").read_text())
    assert report["nodes"]["quantized"] == 1
    assert report["nodes"]["skipped"]["fc2"] == "in the ignored scope"


def test_synthetic_is_flagged(workspace):
    """--synthetic works and the report says so."""
    folder, model, _, _ = workspace
    assert main([str(model), "--target", "ort-cpu", "--synthetic", "-q"]) == 0
    report = json.loads((folder / "mlp.ort-cpu.report.json").read_text())
    assert report["data"]["synthetic"] is True and report["warnings"]


def test_cnn_through_the_cli(tmp_path):
    """Conv and Gemm compile and fuse (QLinearConv, QGemm) from the command line."""
    model = io.save(gemm_conv_model(), tmp_path / "cnn.onnx")
    arguments = [str(model), "--target", "ort-cpu", "--synthetic", "-q"]
    assert main(arguments) == 0
    report = json.loads((tmp_path / "cnn.ort-cpu.report.json").read_text())
    assert report["fusion"]["kernels"] == {"QGemm": 1, "QLinearConv": 1}
    assert "max_abs_shift" in report["bias_correction"]["conv"]  # on by default for Convs
    assert report["activation_quantizers"]["relu_out"]["folded_activation"] == "relu"
    assert main([*arguments, "--no-bias-correction", "-o", str(tmp_path / "plain.onnx")]) == 0
    assert json.loads((tmp_path / "plain.report.json").read_text())["bias_correction"] == {}


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["{missing}", "--target", "ort-cpu", "--synthetic"], "missing.onnx: model file not found"),
        (["{garbage}", "--target", "ort-cpu", "--synthetic"], "garbage.onnx: not"),
        (
            ["{model}", "--target", "ort-cpu", "--synthetic", "-o", "{model}"],
            "the output path is the input model",
        ),
        (["{model}", "--target", "tpu", "--synthetic"], "--target: unknown target 'tpu'"),
        (["{model}", "--target", "ort-cpu"], "pass exactly one of --data DIR"),
        (
            ["{model}", "--target", "ort-cpu", "--data", "{badname}"],
            r"bad\.npz: unknown input name\(s\) \['y'\]",
        ),
        (
            ["{model}", "--target", "ort-cpu", "--data", "{badshape}"],
            "'x' has size 5 on axis 1, the model expects 6",
        ),
        (
            ["{model}", "--target", "ort-cpu", "--synthetic", "--preset", "cnn"],
            "--preset: 'cnn' is not one of",
        ),
        (["{model}", "--target", "ort-cpu", "--text", "{model}"], "--text needs --tokenizer"),
        (
            ["{quantized}", "--target", "ort-cpu", "--synthetic"],
            r"quantized.onnx: already quantized \(node '.*' is QuantizeLinear\)",
        ),
    ],
)
def test_bad_input_is_one_line_naming_the_culprit(workspace, capsys, arguments, message):
    """Exit code 2, a single stderr line that names the cause, no output files, input unchanged."""
    import re

    folder, model, _, digest = workspace
    (folder / "garbage.onnx").write_bytes(b"\x08\x07garbage")
    for name, array in (
        ("badname", {"y": np.zeros((2, 6, 8), np.float32)}),
        ("badshape", {"x": np.zeros((2, 5, 8), np.float32)}),
    ):
        (folder / name).mkdir()
        np.savez(folder / name / "bad.npz", **array)
    quantized = folder / "quantized.onnx"
    main(
        [
            str(model),
            "--target",
            "ort-cpu",
            "--synthetic",
            "-q",
            "-o",
            str(quantized),
            "--report",
            str(folder / "q.json"),
        ]
    )
    capsys.readouterr()
    paths = {
        "quantized": quantized,
        "missing": folder / "missing.onnx",
        "garbage": folder / "garbage.onnx",
        "model": model,
        "badname": folder / "badname",
        "badshape": folder / "badshape",
    }
    code = main([argument.format(**paths) for argument in arguments])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("qcompile: error: ")
    assert re.search(message, err), err
    assert not (folder / "mlp.ort-cpu.onnx").exists()
    assert _unchanged(model, digest)


def test_console_script_exit_code(workspace):
    """The installed entry point returns non-zero with one line on stderr."""
    folder, _, _, _ = workspace
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qcompiler.cli",
            str(folder / "nope.onnx"),
            "--target",
            "ort-cpu",
            "--synthetic",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().endswith("nope.onnx: model file not found")


def test_external_data_input_and_output_are_safe(tmp_path):
    """A model with external data compiles; --external-data writes <out>.data; input files unchanged."""
    model = io.save(mlp_with_attention_matmul(), tmp_path / "ext.onnx", external_data=True)
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    assert main([str(model), "--target", "ort-cpu", "--synthetic", "--external-data", "-q"]) == 0
    assert (tmp_path / "ext.ort-cpu.onnx.data").exists()
    for name, digest in digests.items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest
    # default preset: x, relu, and both inputs of the scores MatMul
    assert sum(node.op_type == "QuantizeLinear" for node in io.load(tmp_path / "ext.ort-cpu.onnx").graph) == 4


def test_large_model_path_goes_through_external_files(tmp_path, monkeypatch):
    """Above the protobuf limit, sessions and saves use external data; results are unchanged."""
    from qcompiler.backends.onnxruntime import fusion

    model = io.save(mlp_with_attention_matmul(), tmp_path / "m.onnx")
    assert (
        main([str(model), "--target", "ort-cpu", "--synthetic", "-o", str(tmp_path / "small.onnx"), "-q"])
        == 0
    )
    monkeypatch.setattr(io, "IN_MEMORY_LIMIT", 0)  # sessions from temporary files with external data
    monkeypatch.setattr(fusion, "PROTOBUF_LIMIT", 0)
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 0)
    assert (
        main([str(model), "--target", "ort-cpu", "--synthetic", "-o", str(tmp_path / "large.onnx"), "-q"])
        == 0
    )
    assert (tmp_path / "large.onnx.data").exists() and not (tmp_path / "small.onnx.data").exists()
    small = json.loads((tmp_path / "small.report.json").read_text())
    large = json.loads((tmp_path / "large.report.json").read_text())
    assert (
        small["fusion"] == large["fusion"]
        and small["activation_quantizers"] == large["activation_quantizers"]
    )


def _token_model():
    """input_ids -> Gather(embedding) -> MatMul: the smallest graph text data can feed."""
    import onnx_ir as ir

    from tests.graphs import add, const, model_of

    ids = ir.Value(
        name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "sequence"])
    )
    graph = ir.Graph([ids], [], nodes=[], name="tokens")
    rng = np.random.default_rng(0)
    h = add(
        graph,
        "Gather",
        [const(graph, "embedding", rng.standard_normal((16, 8)).astype(np.float32)), ids],
        "embed",
    )
    graph.outputs.append(
        add(graph, "MatMul", [h, const(graph, "w", rng.standard_normal((8, 4)).astype(np.float32))], "head")
    )
    return model_of(graph)


@pytest.mark.parametrize("windows", [False, True])
def test_text_data_lines_or_windows(tmp_path, tokenizer_json, windows):
    """--text feeds tokenized lines, or with --text-windows fixed-length windows of one stream."""
    model = io.save(_token_model(), tmp_path / "tok.onnx")
    text = tmp_path / "calib.txt"
    text.write_text("hello world the quick\nbrown fox jumps abc\nhello fox\n", encoding="utf-8")
    arguments = [
        str(model),
        "--target",
        "ort-cpu",
        "--text",
        str(text),
        "--tokenizer",
        str(tokenizer_json),
        "-q",
    ]
    arguments += ["--text-windows", "--seq-len", "3"] if windows else []
    assert main(arguments) == 0
    report = json.loads((tmp_path / "tok.ort-cpu.report.json").read_text())
    assert ("windows of 3 tokens" in report["data"]["description"]) == windows
    assert report["nodes"]["quantized"] == 1 and report["fusion"]["fused"] == 1


def test_old_opset_is_upgraded_and_reported(tmp_path, capsys):
    """An opset-11 model is upgraded (onnx's version converter), compiled, and the report says so."""
    from tests.graphs import model_of

    model = mlp_with_attention_matmul()
    old = io.save(model_of(model.graph, opset=11), tmp_path / "old.onnx")
    assert main([str(old), "--target", "ort-cpu", "--synthetic"]) == 0
    report = json.loads((tmp_path / "old.ort-cpu.report.json").read_text())
    assert report["model"]["opset"] == 11 and report["model"]["opset_upgraded_to"] == 13
    assert "upgraded: opset 11 -> 13" in capsys.readouterr().out
    assert io.load(tmp_path / "old.ort-cpu.onnx").opset_imports[""] == 13
    assert report["nodes"]["quantized"] == 4


def test_nothing_to_do_is_an_error_with_the_commonest_reason(tmp_path, capsys):
    """A compile that quantizes nothing exits 2 naming the reason and the first node; nothing is written."""
    import onnx_ir as ir

    from tests.graphs import add, float_input, model_of

    x = float_input("x", [2, 8])
    graph = ir.Graph([x], [], nodes=[], name="scores")
    graph.outputs.append(add(graph, "MatMul", [x, add(graph, "Transpose", [x], "t")], "scores"))
    path = io.save(model_of(graph), tmp_path / "scores.onnx")
    assert main([str(path), "--target", "ort-cpu", "--synthetic", "--preset", "transformer", "-q"]) == 2
    err = capsys.readouterr().err
    assert (
        "nothing was quantized or compressed for ort-cpu: 1 of 1 candidate nodes skipped because no constant weight"
        in err
    )
    assert "(first: 'scores')" in err
    assert not (tmp_path / "scores.ort-cpu.onnx").exists()


def test_skip_reasons_are_printed_with_counts(workspace, capsys):
    """Part of what was asked skipped: the terminal summary lists each reason with its count."""
    _, model, data, _ = workspace
    assert main([str(model), "--target", "ort-cpu", "--data", str(data), "--preset", "transformer"]) == 0
    out = capsys.readouterr().out
    assert "1 x no constant weight (transformer preset quantizes only weighted ops)" in out


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], (128, 128)),  # lines: 128 of --seq-len tokens
        (["--text-windows"], (32, 512)),  # a causal LM: 512-token windows, 16384 tokens in all
        (["--text-windows", "--seq-len", "1024"], (16, 1024)),
        (["--text-windows", "--val-seq-len", "256"], (64, 256)),
        (["--text-windows", "--val-samples", "8"], (8, 512)),
        (["--val-seq-len", "64", "--val-samples", "10"], (10, 64)),
    ],
)
def test_validation_defaults_measure_a_causal_lm_at_its_context(flags, expected):
    """--max-drop on a causal LM validates on 512-token windows unless told otherwise, not on --seq-len's 128."""
    from qcompiler.cli import build_parser, validation_shape

    args = build_parser().parse_args(["m.onnx", "--target", "ort-cpu", *flags])
    assert validation_shape(args) == expected
