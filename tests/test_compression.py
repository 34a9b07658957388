"""Weight-only compression: planning, the canonical form, AWQ folding and ORT lowering, on a small
decoder-shaped graph built here (embedding -> LayerNorm -> q/k -> ... -> LM head)."""

import collections
import hashlib
import json

import numpy as np
import onnx_ir as ir
import pytest

import qcompiler
from qcompiler.backends.onnxruntime.lower_weights import lower_weights
from qcompiler.backends.onnxruntime.session import create_session, session_options
from qcompiler.calibration import collect
from qcompiler.canonical import (
    canonical_consumer,
    dequantize_canonical,
    read_canonical,
    write_canonical,
)
from qcompiler.cli import main
from qcompiler.options import CompressionOptions, IgnoredScope, WeightFormat
from qcompiler.rewrites.compression import apply_awq, compress_unit, compress_weights
from qcompiler.rewrites.normalize import NormalizePass
from qcompiler.rewrites.weight_plan import plan_compression, stat_requests
from tests.graphs import ORT_RUNNERS, add, const, model_of, run

VOCAB, HIDDEN, INNER = 40, 64, 32


def tiny_decoder() -> ir.Model:
    """ids -> Gather(embedding) -> LayerNorm -> {q, k} MatMuls -> Add -> Relu -> out MatMul -> head."""
    rng = np.random.default_rng(7)
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", 12]))
    graph = ir.Graph([ids], [], nodes=[], name="decoder")
    embedded = add(
        graph,
        "Gather",
        [const(graph, "embedding", rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)), ids],
        "embed",
    )
    outliers = np.ones(HIDDEN, np.float32)
    outliers[::9] = 8.0  # channels with large activations: what AWQ is for
    normed = add(
        graph,
        "LayerNormalization",
        [embedded, const(graph, "ln_scale", outliers), const(graph, "ln_bias", np.zeros(HIDDEN, np.float32))],
        "norm",
        axis=-1,
    )

    def linear(x: ir.Value, weight: str, rows: int, columns: int, name: str) -> ir.Value:
        array = (rng.standard_normal((rows, columns)) * 0.1).astype(np.float32)
        return add(graph, "MatMul", [x, const(graph, weight, array)], name)

    q = linear(normed, "wq", HIDDEN, INNER, "q_proj")
    k = linear(normed, "wk", HIDDEN, INNER, "k_proj")
    mixed = add(graph, "Relu", [add(graph, "Add", [q, k], "mix")], "relu")
    out = linear(mixed, "wo", INNER, HIDDEN, "o_proj")
    logits = linear(out, "head", HIDDEN, VOCAB, "lm_head")
    logits.name = "logits"
    graph.outputs.append(logits)
    return model_of(graph)


def _feeds(count=4):
    rng = np.random.default_rng(1)
    return [{"ids": rng.integers(0, VOCAB, (2, 12))} for _ in range(count)]


def test_plan_follows_nncf_policy_and_all_layers():
    units, skipped = plan_compression(tiny_decoder(), CompressionOptions(group_size=32), IgnoredScope())
    roles = {str(u.node.name): (u.role, u.format, u.group_size) for u in units}
    assert roles["embed"] == ("embedding", WeightFormat.INT8, 64)  # blocks along the row
    assert roles["lm_head"] == ("head", WeightFormat.INT8, 64)  # blocks of 64 rows (here: all of K)
    assert roles["q_proj"] == ("matmul", WeightFormat.INT4, 32) and roles["o_proj"][1] is WeightFormat.INT4
    units, _ = plan_compression(
        tiny_decoder(), CompressionOptions(backup_layers=False), IgnoredScope(names=("o_proj",))
    )
    assert {u.format for u in units} == {WeightFormat.INT4} and "o_proj" not in {
        str(u.node.name) for u in units
    }


def _dequantized_twin(model: ir.Model) -> ir.Model:
    """A float copy of a canonical compressed model: every weight DQ replaced by its values."""
    twin = model.clone()
    assert dequantize_canonical(twin) > 0
    return twin


@pytest.mark.parametrize(
    "options",
    [
        CompressionOptions(format=WeightFormat.INT4, group_size=32, symmetric=True, accuracy_level=0),
        CompressionOptions(format=WeightFormat.INT4, group_size=16, symmetric=False, accuracy_level=0),
        CompressionOptions(format=WeightFormat.INT8, group_size=0, accuracy_level=0),
        CompressionOptions(format=WeightFormat.NF4, group_size=32, accuracy_level=0),
        CompressionOptions(format=WeightFormat.INT4, group_size=0, backup_layers=False, accuracy_level=0),
    ],
    ids=["int4-sym-g32", "int4-asym-g16", "int8-per-channel", "nf4", "int4-per-channel-all"],
)
def test_lowered_kernels_compute_the_canonical_form(options):
    """ORT's packed kernels (MatMulNBits, MatMulBnb4, GatherBlockQuantized) on our lowering give
    the outputs of the float model holding the dequantized weights (accuracy_level 0)."""
    model = tiny_decoder()
    units, _ = plan_compression(model, options, IgnoredScope())
    report = compress_weights(model, units, {}, options, IgnoredScope(), progress=False)
    assert all(node.op_type != "MatMul" or node.inputs[1].const_value is None for node in model.graph)
    expected = run(_dequantized_twin(model), _feeds(1)[0])[0]
    kernels = lower_weights(model, options.accuracy_level)
    matmul_kernel = "MatMulBnb4" if options.format is WeightFormat.NF4 else "MatMulNBits"
    assert sorted(kernels.values()) == sorted(
        [matmul_kernel] * 3
        + ["MatMulNBits" if options.backup_layers else matmul_kernel, "GatherBlockQuantized"]
    )
    assert "DequantizeLinear" not in [node.op_type for node in model.graph]
    np.testing.assert_allclose(run(model, _feeds(1)[0])[0], expected, rtol=1e-4, atol=1e-4)
    assert set(report["layers"]) == {"embed", "q_proj", "k_proj", "o_proj", "lm_head"}
    kernel = next(node for node in model.graph if node.op_type == matmul_kernel)
    assert options.format.value in kernel.metadata_props["qcompiler.compression"]


def test_awq_folds_into_the_layernorm_exactly():
    """AWQ's scaling leaves the float model's outputs unchanged and shrinks the LayerNorm scale."""
    model = tiny_decoder()
    NormalizePass()(model)  # types every value, as compile does
    reference = run(model, _feeds(1)[0])[0]
    options = CompressionOptions(group_size=32, symmetric=True, awq=True)
    units, _ = plan_compression(model, options, IgnoredScope())
    statistics = collect(model, stat_requests(units, options), _feeds(), ORT_RUNNERS, progress=False)
    grams = {str(r.value.name): statistics[r] for r in stat_requests(units, options)}
    report = apply_awq(model, units, grams, IgnoredScope(), progress=False)
    folded = report[str(units[1].activation.name)]
    assert folded["alpha"] > 0 and folded["applied"].startswith("folded into LayerNormalization")
    assert report["relu_out"]["applied"] == "not searched (Relu cannot absorb a per-channel scale)"
    np.testing.assert_allclose(run(model, _feeds(1)[0])[0], reference, rtol=1e-4, atol=1e-4)


def test_compile_data_aware_beats_rtn_on_outputs():
    """AWQ + scale estimation + GPTQ give logits closer to FP32 than RTN (same format)."""
    model = tiny_decoder()
    feeds = _feeds(8)
    reference = np.concatenate([run(model, feed)[0] for feed in feeds])
    errors = {}
    for name, flags in {"rtn": {}, "all": {"awq": True, "scale_estimation": True, "gptq": True}}.items():
        options = qcompiler.CompileOptions(
            compression=CompressionOptions(group_size=16, symmetric=True, **flags)
        )
        result = qcompiler.compile(model, "ort-cpu", options, data=feeds, progress=False)
        got = np.concatenate([run(result.model, feed)[0] for feed in feeds])
        errors[name] = float(np.mean((got - reference) ** 2))
        assert result.report.nodes["compressed"] == 5
    assert errors["all"] < 0.8 * errors["rtn"], errors


def test_ratio_moves_the_most_sensitive_weights_to_int8():
    model = tiny_decoder()
    options = qcompiler.CompileOptions(compression=CompressionOptions(group_size=16, ratio=0.5))
    result = qcompiler.compile(model, "ort-cpu", options, data=_feeds(), progress=False)
    layers = result.report.compression["layers"]
    int8 = [
        name
        for name, entry in layers.items()
        if entry["role"] == "matmul" and entry["how"].startswith("int8")
    ]
    assert len(int8) >= 1 and all("sensitivity" in layers[n] for n in ("q_proj", "k_proj", "o_proj"))
    most = max(("q_proj", "k_proj", "o_proj"), key=lambda n: layers[n]["sensitivity"])
    assert most in int8


def test_cli_weight_only_without_data_and_errors(tmp_path, capsys):
    path = qcompiler.save(tiny_decoder(), tmp_path / "decoder.onnx")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (
        main(
            [str(path), "--target", "ort-cpu", "--weights", "int4", "--group-size", "32", "--symmetric", "-q"]
        )
        == 0
    )
    report = json.loads((tmp_path / "decoder.ort-cpu.report.json").read_text())
    assert sorted(report["compression"]["kernels"].values()).count("MatMulNBits") == 4
    compressed = qcompiler.load(tmp_path / "decoder.ort-cpu.onnx")
    assert compressed.metadata_props["qcompiler.weights"] == "int4"
    for arguments, message in (
        (["--awq"], "--awq applies to weight-only compression: add --weights FORMAT"),
        (["--weights", "int5"], "--weights: 'int5' is not one of"),
        (["--weights", "int4", "--gptq"], "but --awq/--scale-estimation/--gptq/--ratio do"),
        (["--weights", "int4", "--group-size", "48"], "power-of-two block size"),
        (["--weights", "int4", "--ratio", "2"], "--ratio must be in [0, 1]"),
    ):
        capsys.readouterr()
        assert main([str(path), "--target", "ort-cpu", "-o", str(tmp_path / "out.onnx"), *arguments]) == 2
        assert message in capsys.readouterr().err
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_fp8_weights_raise_the_opset_and_run_in_onnxruntime():
    """FP8 E4M3 per-channel DQs stay (ORT runs float8 DequantizeLinear from opset 19): the model
    is raised from 17 to 19 and computes the dequantized weights' outputs."""
    model = tiny_decoder()
    options = CompressionOptions(format=WeightFormat.FP8, accuracy_level=0)
    units, _ = plan_compression(model, options, IgnoredScope())
    compress_weights(model, units, {}, options, IgnoredScope(), progress=False)
    expected = run(_dequantized_twin(model), _feeds(1)[0])[0]
    kernels = lower_weights(model, 0)
    assert model.opset_imports[""] == 19
    assert sorted(set(kernels.values())) == ["DequantizeLinear-19", "GatherBlockQuantized", "MatMulNBits"]
    np.testing.assert_allclose(run(model, _feeds(1)[0])[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_fp4_weights_run_in_onnxruntime_through_our_packed_op(tmp_path, fmt):
    """ort-cpu: every FP4 MatMul becomes ai.onnx.contrib.MatMulFP4 (the embedding and head stay
    INT8 kernels); the saved model runs in onnxruntime and computes the dequantized weights' outputs
    (accuracy_level 0 for the INT8 head, so the comparison is float to float)."""
    model = tiny_decoder()
    options = CompressionOptions(format=WeightFormat(fmt), symmetric=True, accuracy_level=0)
    units, _ = plan_compression(model, options, IgnoredScope())
    compress_weights(model, units, {}, options, IgnoredScope(), progress=False)
    expected = run(_dequantized_twin(model), _feeds(1)[0])[0]
    compiled = qcompiler.compile(
        tiny_decoder(), "ort-cpu", qcompiler.CompileOptions(compression=options), progress=False
    )
    saved = qcompiler.load(qcompiler.save(compiled.model, tmp_path / "decoder.ort-cpu.onnx"))
    kinds = collections.Counter((node.domain, node.op_type) for node in saved.graph)
    assert kinds[("ai.onnx.contrib", "MatMulFP4")] == 3 and kinds[("com.microsoft", "MatMulNBits")] == 1
    session = create_session(saved, session_options())  # registers the op
    np.testing.assert_allclose(session.run(None, _feeds(1)[0])[0], expected, rtol=1e-4, atol=1e-4)
    path = qcompiler.save(tiny_decoder(), tmp_path / "decoder.onnx")  # the CLI path too
    assert main([str(path), "--target", "ort-cpu", "--weights", fmt, "-q"]) == 0
    assert (tmp_path / "decoder.ort-cpu.onnx").exists()


def test_opset_upgrade_moves_reduce_axes_to_an_input():
    """onnxscript's converter leaves ReduceL2's `axes` attribute at opset 18+; upgrade_opset moves
    it to an input and the model computes the same in onnxruntime."""
    from qcompiler.opset import upgrade_opset
    from tests.graphs import float_input

    x = float_input("x", [2, 5])
    graph = ir.Graph([x], [], nodes=[], name="norm")
    graph.outputs.append(add(graph, "ReduceL2", [x], "l2", axes=[1], keepdims=1))
    model = model_of(graph, opset=17)
    feed = {"x": np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)}
    expected = run(model, feed)[0]
    assert upgrade_opset(model, 21) and not upgrade_opset(model, 19)
    node = next(iter(model.graph))
    assert "axes" not in node.attributes and node.inputs[1].const_value.numpy().tolist() == [1]
    np.testing.assert_allclose(run(model, feed)[0], expected, rtol=1e-6)


@pytest.mark.parametrize("fmt", list(WeightFormat))
def test_canonical_form_reads_back_what_was_written(fmt):
    """read_canonical inverts write_canonical for every format, MatMul weights and embeddings."""
    model = tiny_decoder()
    options = CompressionOptions(format=fmt, group_size=32, backup_layers=False)
    units, _ = plan_compression(model, options, IgnoredScope())
    written = {}
    for unit in units:
        compressed, how, error = compress_unit(unit, None, options)
        assert error is None
        written[str(unit.node.name)] = compressed
        write_canonical(model.graph, unit.node, compressed, how)
    for dq in list(model.graph):
        consumer = canonical_consumer(dq)
        if consumer is None:
            continue
        read, expected = read_canonical(dq), written[str(consumer.name)]
        assert read.format is expected.format and read.block_size == expected.block_size
        np.testing.assert_array_equal(read.dequantize(), expected.dequantize())
    assert dequantize_canonical(model) == len(units)


def test_gptq_compresses_each_piece_as_calibration_finishes_it():
    """With scale estimation + GPTQ (no AWQ), a model calibrated piece by piece has each layer
    compressed when its piece is done, and comes out as when every statistic is collected first."""
    from qcompiler.calibration import Statistics
    from qcompiler.options import CalibrationOptions, CalibrationRuntime
    from qcompiler.rewrites import layerwise as compression_module

    model, feeds = tiny_decoder(), _feeds(6)
    calls: list[int] = []
    original = compression_module.LayerwiseCompression.__call__

    def counting(self, statistics: Statistics) -> None:
        calls.append(len(self.remaining))
        original(self, statistics)

    results = {}
    for name, piece_bytes in (("whole", None), ("pieces", 1)):
        options = qcompiler.CompileOptions(
            compression=CompressionOptions(group_size=16, symmetric=True, scale_estimation=True, gptq=True),
            calibration=CalibrationOptions(runtime=CalibrationRuntime.ONNXRUNTIME, piece_bytes=piece_bytes),
        )
        calls.clear()
        compression_module.LayerwiseCompression.__call__ = counting  # type: ignore[method-assign]
        try:
            results[name] = qcompiler.compile(model, "ort-cpu", options, data=feeds, progress=False)
        finally:
            compression_module.LayerwiseCompression.__call__ = original  # type: ignore[method-assign]
        results[name + "_calls"] = list(calls)
    assert len(results["whole_calls"]) == 1 and len(results["pieces_calls"]) >= 3
    assert results["pieces_calls"] == sorted(results["pieces_calls"], reverse=True)  # units left shrink
    whole, pieces = results["whole"], results["pieces"]
    assert whole.report.compression["layers"].keys() == pieces.report.compression["layers"].keys()
    for name, value in whole.model.graph.initializers.items():
        np.testing.assert_array_equal(
            pieces.model.graph.initializers[name].const_value.numpy(), value.const_value.numpy()
        )


def test_awq_runs_piece_by_piece_too_and_skips_folds_into_compressed_pieces():
    """AWQ + SE + GPTQ piece by piece (every weight its own piece): the norm group is searched and
    folded as when all statistics come first; the head's group, whose producer (o_proj) was
    compressed in an earlier piece, is left unscaled with that reason; outputs stay as close."""
    from qcompiler.options import CalibrationOptions, CalibrationRuntime

    model, feeds = tiny_decoder(), _feeds(6)
    reference = np.concatenate([run(model, feed)[0] for feed in feeds])
    results, errors = {}, {}
    for name, piece_bytes in (("whole", None), ("pieces", 1)):
        options = qcompiler.CompileOptions(
            compression=CompressionOptions(
                group_size=16, symmetric=True, awq=True, scale_estimation=True, gptq=True
            ),
            calibration=CalibrationOptions(runtime=CalibrationRuntime.ONNXRUNTIME, piece_bytes=piece_bytes),
        )
        results[name] = qcompiler.compile(model, "ort-cpu", options, data=feeds, progress=False)
        got = np.concatenate([run(results[name].model, feed)[0] for feed in feeds])
        errors[name] = float(np.mean((got - reference) ** 2))
    whole, pieces = (results[name].report.compression["awq"] for name in ("whole", "pieces"))
    assert pieces["norm_out"] == whole["norm_out"] and whole["norm_out"]["applied"].startswith("folded")
    assert whole["o_proj_out"]["applied"] == "folded into MatMul 'o_proj'"
    assert pieces["o_proj_out"]["applied"].startswith("not applied (MatMul 'o_proj' has no constant")
    assert errors["pieces"] <= 1.5 * errors["whole"], errors
