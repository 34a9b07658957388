"""OpenVINO targets: lowering per weight format against the numpy reference in OpenVINO, the
device presets, the checker's rules (one test per rejection), W8A8 and the CLI, on graphs built
here with onnx_ir (ONNX side) and openvino.opset13 (artifact side)."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import openvino as ov
import openvino.opset13 as ops
import pytest

import qcompiler
from qcompiler.backends.openvino.checker import check as check_artifact
from qcompiler.backends.openvino.checker import decompressions, runtime_precisions
from qcompiler.backends.openvino.lower import to_openvino
from qcompiler.backends.openvino.save import save_openvino
from qcompiler.canonical import dequantize_canonical
from qcompiler.cli import main
from qcompiler.errors import LegalityError, ModelSaveError
from qcompiler.options import CompileOptions, CompressionOptions, Preset, WeightFormat
from qcompiler.targets import OPENVINO_CPU, OPENVINO_GPU, OPENVINO_NPU, adapt_options
from qcompiler.weight_formats import pack_nibbles
from tests.graphs import add, const, float_input, mlp_with_attention_matmul, model_of, random_feeds, run
from tests.test_compression import tiny_decoder

EXACT = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
"""OpenVINO CPU without its dynamic int8 quantization of activations: the weights' own error only."""


def _matmul_model(rows: int = 96, columns: int = 48) -> ir.Model:
    rng = np.random.default_rng(0)
    x = float_input("x", [3, rows])
    graph = ir.Graph([x], [], nodes=[], name="one_matmul")
    weight = rng.standard_normal((rows, columns)).astype(np.float32)
    graph.outputs.append(add(graph, "MatMul", [x, const(graph, "w", weight)], "fc"))
    return model_of(graph, 21)


def _weights_only(fmt: str, symmetric: bool, group: int, *, backup: bool = False) -> CompileOptions:
    compression = CompressionOptions(
        format=WeightFormat(fmt), symmetric=symmetric, group_size=group, backup_layers=backup
    )
    return CompileOptions(compression=compression)


def _reference(model: ir.Model, feed: dict[str, np.ndarray]) -> np.ndarray:
    """What the canonical form means: its weights dequantized in numpy, run in onnxruntime."""
    dequantized = model.clone()
    dequantize_canonical(dequantized)
    return run(dequantized, feed)[0]


FORMATS = [
    ("int8", True, 0, "i8"),
    ("int8", False, 32, "u8"),
    ("int4", True, 32, "i4"),
    ("int4", False, 32, "u4"),
    ("int4", True, 0, "i4"),
    ("int4", False, 64, "u4"),  # 96 rows: OpenVINO needs whole blocks, so group 32 (see below)
    ("nf4", True, 32, "nf4"),
    ("mxfp4", True, 0, "f4e2m1"),
    ("nvfp4", True, 0, "f4e2m1"),
    ("fp8", True, 0, "f8e4m3"),
]


@pytest.mark.parametrize(("fmt", "symmetric", "group", "element"), FORMATS)
def test_every_format_lowers_to_its_element_type_and_matches_the_reference(fmt, symmetric, group, element):
    model = _matmul_model()
    result = qcompiler.compile(model, "openvino-cpu", _weights_only(fmt, symmetric, group), progress=False)
    (found,) = decompressions(result.artifact)
    assert (found.element_type, found.reader_type, found.problem) == (element, "MatMul", "")
    assert found.zero_point == (not symmetric and fmt in ("int8", "int4"))
    if fmt in ("int8", "int4", "nf4"):  # 96 rows: group 64 does not divide them, 32 does
        assert found.group_size == {64: 32}.get(group, group)
    feed = {"x": np.random.default_rng(1).standard_normal((3, 96)).astype(np.float32)}
    compiled = ov.Core().compile_model(result.artifact, "CPU", EXACT)
    expected = _reference(result.model, feed)
    np.testing.assert_allclose(compiled(feed)[0], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_a_group_that_does_not_divide_k_becomes_the_largest_one_that_does():
    result = qcompiler.compile(
        _matmul_model(rows=96), "openvino-cpu", _weights_only("int4", True, 64), progress=False
    )
    (found,) = decompressions(result.artifact)
    assert found.group_size == 32  # 96 = 3 x 32; the CPU plugin decompresses a padded last block
    assert any("group 32" in warning for warning in result.report.warnings)
    onnx_result = qcompiler.compile(
        _matmul_model(rows=96), "ort-cpu", _weights_only("int4", True, 64), progress=False
    )
    assert not onnx_result.report.warnings  # MatMulNBits pads the last block itself


def test_gpu_decompresses_in_f16_and_embeddings_stay_compressed():
    model = tiny_decoder()
    result = qcompiler.compile(
        model, "openvino-gpu", _weights_only("int4", True, 16, backup=True), progress=False
    )
    kinds = {item.reader_type for item in decompressions(result.artifact)}
    assert kinds == {"MatMul", "Gather"}  # the embedding table is read compressed by its Gather
    converts = [op for op in result.artifact.get_ordered_ops() if op.get_type_name() == "Convert"]
    assert any(op.get_output_element_type(0) == ov.Type.f16 for op in converts)
    feed = {"ids": np.random.default_rng(2).integers(0, 40, (2, 12)).astype(np.int64)}
    expected = _reference(result.model, feed)
    output = ov.Core().compile_model(result.artifact, "CPU", EXACT)(feed)[0]
    # f16 scales: relative error of the scale rounding (2^-11), not of the weights
    np.testing.assert_allclose(output, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_pack_nibbles_puts_the_first_element_low():
    assert pack_nibbles(np.array([1, 2, 3], np.uint8)).tolist() == [0x21, 0x03]
    assert pack_nibbles(np.array([-1, 7], np.int8)).tolist() == [0x7F]


# Presets ---------------------------------------------------------------------------------------


def test_presets_are_data_per_device():
    assert (OPENVINO_CPU.device, OPENVINO_CPU.inference_precision, OPENVINO_CPU.decompression) == (
        "CPU",
        "f32",
        "f32",
    )
    assert (OPENVINO_GPU.inference_precision, OPENVINO_GPU.decompression) == ("f16", "f16")
    assert OPENVINO_NPU.symmetric_weights and OPENVINO_NPU.weight_group_sizes == (0, 128)
    assert OPENVINO_NPU.unified_eltwise_scales and not OPENVINO_CPU.unified_eltwise_scales
    assert {t.backend for t in (OPENVINO_CPU, OPENVINO_GPU, OPENVINO_NPU)} == {"openvino"}


def test_npu_adapts_asymmetric_int4_and_its_group_and_says_so():
    adapted, notes = adapt_options(_weights_only("int4", False, 64), OPENVINO_NPU)
    assert adapted.compression.symmetric and adapted.compression.group_size == 128
    assert len(notes) == 2 and all("openvino-npu" in note for note in notes)
    same, none = adapt_options(_weights_only("int4", False, 64), OPENVINO_CPU)
    assert same.compression.group_size == 64 and not none


def test_npu_compiles_weights_whose_k_is_not_a_multiple_of_128_per_channel():
    result = qcompiler.compile(
        _matmul_model(rows=192), "openvino-npu", _weights_only("int4", False, 32), progress=False
    )
    (found,) = decompressions(result.artifact)
    assert (found.element_type, found.group_size, found.zero_point) == ("i4", 0, False)
    assert any("per channel" in warning for warning in result.report.warnings)
    assert sum("adapted" in warning for warning in result.report.warnings) == 3


# Checker: one test per rejection ---------------------------------------------------------------


def _weight_constant(element: str, shape: list[int]):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 8, shape).astype(np.uint8)
    tensor = ov.Tensor(getattr(ov.Type, element), ov.Shape(shape))
    data = pack_nibbles(codes.reshape(-1)) if element in ("u4", "i4") else codes.reshape(-1)
    tensor.data.reshape(-1)[:] = data
    return ov.op.Constant(tensor, shared_memory=False)


def _fq(value, lo: float, hi: float):
    bounds = [ops.constant(np.float32(lo)), ops.constant(np.float32(hi))]
    return ops.fake_quantize(value, *bounds, *bounds, 256)


def _decompressed(
    element: str = "i4", zero_point: bool = False, group: int = 32, rows: int = 64, columns: int = 16
):
    shape = [columns, rows // group, group] if group else [columns, rows]
    values = ops.convert(_weight_constant(element, shape), ov.Type.f32)
    if zero_point:
        values = ops.subtract(values, ops.convert(_weight_constant(element, [*shape[:-1], 1]), ov.Type.f32))
    values = ops.multiply(values, ops.constant(np.full([*shape[:-1], 1], 0.1, np.float32)))
    if group:
        values = ops.reshape(values, ops.constant(np.array([columns, rows], np.int64)), False)
    return values


def _model_with(weight, *, quantize_input: bool = False, rows: int = 64):
    x = ops.parameter([2, rows], ov.Type.f32, name="x")
    source = _fq(x, -3.0, 3.0) if quantize_input else x
    matmul = ops.matmul(source, weight, False, True)
    matmul.set_friendly_name("fc")
    return ov.Model([matmul], [x], "checked")


def test_checker_accepts_a_well_formed_symmetric_int4_weight_on_every_device():
    for target in (OPENVINO_CPU, OPENVINO_GPU):
        assert check_artifact(_model_with(_decompressed("i4", group=32)), target) == []
    assert check_artifact(_model_with(_decompressed("i4", group=0)), OPENVINO_NPU) == []


def test_checker_rejects_a_weight_without_its_scale():
    weight = ops.reshape(
        ops.convert(_weight_constant("u4", [16, 2, 32]), ov.Type.f32),
        ops.constant(np.array([16, 64], np.int64)),
        False,
    )
    with pytest.raises(LegalityError, match="no Multiply by a scale"):
        check_artifact(_model_with(weight), OPENVINO_CPU)


def test_checker_rejects_a_quantized_matmul_with_a_float_weight():
    weight = ops.constant(np.ones((16, 64), np.float32))
    with pytest.raises(LegalityError, match="fc: input 1 is float"):
        check_artifact(_model_with(weight, quantize_input=True), OPENVINO_CPU)
    # an integer weight under its decompression subgraph counts as quantized
    assert check_artifact(_model_with(_decompressed("i8", group=0), quantize_input=True), OPENVINO_CPU) == []


def test_checker_rejects_asymmetric_int4_on_npu():
    with pytest.raises(LegalityError, match="runs symmetric INT4 only"):
        check_artifact(_model_with(_decompressed("u4", zero_point=True, group=0)), OPENVINO_NPU)


def test_checker_rejects_a_group_size_npu_does_not_run():
    with pytest.raises(LegalityError, match="group size 32 of fc"):
        check_artifact(_model_with(_decompressed("i4", group=32)), OPENVINO_NPU)


def test_checker_rejects_eltwise_inputs_with_different_scales_on_npu():
    a = ops.parameter([2, 8], ov.Type.f32, name="a")
    b = ops.parameter([2, 8], ov.Type.f32, name="b")
    summed = ops.add(_fq(a, -1.0, 1.0), _fq(b, -2.0, 2.0))
    summed.set_friendly_name("residual")
    model = ov.Model([summed], [a, b], "eltwise")
    with pytest.raises(LegalityError, match="residual: its two FakeQuantize inputs have different scales"):
        check_artifact(model, OPENVINO_NPU)
    assert check_artifact(model, OPENVINO_CPU) == []  # CPU does not need unified scales


def test_checker_rejects_a_compressed_weight_the_cpu_plugin_decompresses():
    # Batched MatMul (a rank-3 weight) is not a FullyConnected: the CPU plugin folds the weight to f32.
    x = ops.parameter([4, 2, 64], ov.Type.f32, name="x")
    values = ops.multiply(
        ops.convert(_weight_constant("u8", [4, 16, 64]), ov.Type.f32),
        ops.constant(np.full([4, 16, 1], 0.1, np.float32)),
    )
    matmul = ops.matmul(x, values, False, True)
    matmul.set_friendly_name("batched")
    with pytest.raises(LegalityError, match="batched: its u8 weight is decompressed"):
        check_artifact(ov.Model([matmul], [x], "batched"), OPENVINO_CPU)


def test_fp8_weights_on_cpu_are_a_warning_not_an_error():
    result = qcompiler.compile(_matmul_model(), "openvino-cpu", _weights_only("fp8", True, 0), progress=False)
    assert any("f8e4m3 weight is decompressed" in warning for warning in result.report.warnings)


# W8A8 ------------------------------------------------------------------------------------------


def test_w8a8_lowers_to_fakequantize_and_matches_the_qdq_model():
    model = mlp_with_attention_matmul()
    feeds = random_feeds(model, batches=4, batch=2)
    options = CompileOptions(preset=Preset.DEFAULT, count_fusion=False)
    result = qcompiler.compile(model, "openvino-cpu", options, data=feeds, progress=False)
    kinds = collections.Counter(op.get_type_name() for op in result.artifact.get_ordered_ops())
    assert kinds["FakeQuantize"] >= 3 and "DequantizeLinear" not in kinds
    assert {item.element_type for item in decompressions(result.artifact)} == {"i8"}
    compiled = ov.Core().compile_model(result.artifact, "CPU", EXACT)
    expected = run(result.model, feeds[0])  # the same QDQ graph in onnxruntime
    outputs = compiled(feeds[0])
    for index, reference in enumerate(expected):
        np.testing.assert_allclose(outputs[index], reference, atol=0.02 * np.abs(reference).max())


def test_npu_unifies_the_scales_of_eltwise_inputs():
    rng = np.random.default_rng(5)
    x = float_input("x", ["batch", 8])
    graph = ir.Graph([x], [], nodes=[], name="residual")
    h = add(graph, "MatMul", [x, const(graph, "w1", rng.standard_normal((8, 8)).astype(np.float32))], "fc1")
    s = add(graph, "Add", [h, add(graph, "Relu", [x], "relu")], "residual")
    graph.outputs.append(s)
    model = model_of(graph)
    options = CompileOptions(op_types=("MatMul", "Add"), count_fusion=False)
    feeds = random_feeds(model, batches=2, batch=4)
    result = qcompiler.compile(model, "openvino-npu", options, data=feeds, progress=False)
    quantizers = result.report.activation_quantizers
    assert quantizers["fc1_out"]["scale"] == quantizers["relu_out"]["scale"]
    assert quantizers["fc1_out"]["method"] == "unified"
    cpu = qcompiler.compile(model, "openvino-cpu", options, data=feeds, progress=False)
    assert (
        cpu.report.activation_quantizers["fc1_out"]["scale"]
        != cpu.report.activation_quantizers["relu_out"]["scale"]
    )


# Saving and the command line -------------------------------------------------------------------


def test_cli_writes_xml_and_bin_and_refuses_an_onnx_name(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    qcompiler.save(_matmul_model(), path)
    before = path.read_bytes()
    flags = ["--weights", "int4", "--group-size", "32", "--all-layers", "-q"]
    assert main([str(path), "--target", "openvino-cpu", *flags]) == 0
    xml, weights = tmp_path / "m.openvino-cpu.xml", tmp_path / "m.openvino-cpu.bin"
    assert xml.exists() and weights.exists() and path.read_bytes() == before
    loaded = ov.Core().read_model(str(xml))
    assert [item.element_type for item in decompressions(loaded)] == ["u4"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".qcompile-")]  # no staging left
    code = main(
        [str(path), "--target", "openvino-cpu", "--weights", "int4", "-o", str(tmp_path / "x.onnx"), "-q"]
    )
    assert code != 0 and "written as .xml" in capsys.readouterr().err


def test_save_refuses_to_overwrite_a_protected_model(tmp_path):
    model = _model_with(_decompressed())
    save_openvino(model, tmp_path / "a.xml")
    with pytest.raises(ModelSaveError, match="refusing to overwrite"):
        save_openvino(model, tmp_path / "a.xml", protected=(tmp_path / "a.bin",))


@pytest.mark.parametrize("source", ["onnx", "openvino-ir"])
def test_max_drop_measures_in_openvino(openvino_runs, tmp_path, source):
    """The float model and every candidate run in OpenVINO; an OpenVINO IR input takes the same path."""
    calls = openvino_runs
    from tests.test_fallback import _harmful_options, _outlier_model

    model = _outlier_model()
    feeds = random_feeds(model, batches=4, batch=16)
    if source == "openvino-ir":
        model = _as_openvino_ir(model, tmp_path)[1]
    result = qcompiler.compile(
        model, "openvino-cpu", _harmful_options(max_drop=0.001), data=feeds, validation=feeds, progress=False
    )
    fallback = result.report.fallback
    assert fallback["met"] and fallback["drop"] <= 0.001
    assert len(calls) >= 2  # the float model and every candidate ran in OpenVINO
    moved = {name: g["format"] for name, g in fallback["groups"].items() if g["format"] != g["ladder"][0]}
    # only the harmful MatMul moves (OpenVINO names it after its output, "scores")
    assert list(moved) == ["fc2" if source == "onnx" else "scores"]


def test_to_openvino_leaves_the_model_untouched():
    model = _matmul_model()
    result = qcompiler.compile(model, "openvino-cpu", _weights_only("int4", True, 32), progress=False)
    before = [node.op_type for node in result.model.graph]
    to_openvino(result.model)
    assert [node.op_type for node in result.model.graph] == before == ["DequantizeLinear", "MatMul"]


# OpenVINO dialect in onnx_ir -------------------------------------------------------------------


def _small_openvino_model():
    """MVN -> MatMul(transpose_b) -> Add -> Gelu -> Softmax, a Gather and a Reshape: opsets 1-13."""
    rng = np.random.default_rng(4)
    x = ops.parameter([2, 5, 8], ov.Type.f32, name="x")
    ids = ops.parameter([2, 3], ov.Type.i64, name="ids")
    normed = ops.mvn(x, ops.constant(np.array([2], np.int64)), True, 1e-5, "inside_sqrt")
    weight = ops.constant(rng.standard_normal((6, 8)).astype(np.float32))
    hidden = ops.add(
        ops.matmul(normed, weight, False, True), ops.constant(rng.standard_normal(6).astype(np.float32))
    )
    scores = ops.softmax(ops.gelu(hidden, "tanh"), -1)
    table = ops.constant(rng.standard_normal((10, 4)).astype(np.float32))
    embedded = ops.reshape(
        ops.gather(table, ids, ops.constant(np.int64(0))), ops.constant(np.array([2, 12], np.int64)), True
    )
    return ov.Model([scores, embedded], [x, ids], "small")


def test_openvino_dialect_round_trip_is_exact():
    from qcompiler.backends.openvino.dialect import to_openvino_model
    from qcompiler.frontends.openvino_ir import DOMAIN, from_openvino

    original = _small_openvino_model()
    dialect = from_openvino(original)
    kinds = {node.op_type: node for node in dialect.graph}
    assert {node.domain for node in dialect.graph} == {DOMAIN}
    assert {"MVN", "MatMul", "Gelu", "Softmax", "Gather", "Reshape"} <= set(kinds)
    assert kinds["MatMul"].attributes.get_int("transpose_b") == 1 and kinds["Gather"].version == 8
    assert kinds["Gelu"].attributes.get_string("approximation_mode") == "TANH"
    assert len(dialect.graph.initializers) == 6 and [v.name for v in dialect.graph.inputs] == ["x", "ids"]
    rebuilt = to_openvino_model(dialect)
    rng = np.random.default_rng(5)
    feed = {"x": rng.standard_normal((2, 5, 8)).astype(np.float32), "ids": rng.integers(0, 10, (2, 3))}
    core = ov.Core()
    expected = core.compile_model(original, "CPU", EXACT)(feed)
    actual = core.compile_model(rebuilt, "CPU", EXACT)(feed)
    for index in range(2):
        np.testing.assert_array_equal(actual[index], expected[index])


def _saved(model, path):
    ov.save_model(model, str(path), compress_to_fp16=False)
    return path


def test_openvino_ir_loads_with_the_ops_the_passes_read_as_onnx_ops(tmp_path):
    from qcompiler.backends.openvino.dialect import to_openvino_model
    from qcompiler.frontends.openvino_ir import DOMAIN

    path = _saved(_small_openvino_model(), tmp_path / "m.xml")
    model = qcompiler.load(path)
    kinds = {(node.domain, node.op_type) for node in model.graph}
    assert {("", "MatMul"), ("", "Add"), ("", "Gather")} <= kinds
    assert {(DOMAIN, "MVN"), (DOMAIN, "Gelu"), (DOMAIN, "Softmax"), (DOMAIN, "Reshape")} <= kinds
    matmul = next(node for node in model.graph if node.op_type == "MatMul")
    assert matmul.inputs[1].const_value.shape == (8, 6)  # [N, K] with transpose_b -> ONNX's [K, N]
    gather = next(node for node in model.graph if node.op_type == "Gather")
    assert len(gather.inputs) == 2 and gather.attributes.get_int("axis") == 0
    assert model.opset_imports[""] == 21 and model.meta["qcompiler.source_path"] == str(path.resolve())
    rng = np.random.default_rng(5)
    feed = {"x": rng.standard_normal((2, 5, 8)).astype(np.float32), "ids": rng.integers(0, 10, (2, 3))}
    core = ov.Core()
    expected = core.compile_model(_small_openvino_model(), "CPU", EXACT)(feed)
    actual = core.compile_model(to_openvino_model(model), "CPU", EXACT)(feed)
    for index in range(2):
        np.testing.assert_array_equal(actual[index], expected[index])  # lifting is exact


def _as_openvino_ir(model: ir.Model, folder) -> tuple:
    """`model` saved as ONNX and as the OpenVINO IR OpenVINO converts it to (the issue's recipe)."""
    onnx_path = qcompiler.save(model, folder / "m.onnx")
    return onnx_path, _saved(ov.convert_model(str(onnx_path)), folder / "m.xml")


@pytest.mark.parametrize("mode", ["int4-awq-se", "w8a8-smoothquant"])
def test_openvino_ir_input_compiles_like_the_onnx_it_came_from(tmp_path, mode):
    """Same passes, same decisions, same artifact outputs, whether the input is ONNX or its IR."""
    if mode == "int4-awq-se":
        model = tiny_decoder()
        options = CompileOptions(
            compression=CompressionOptions(
                format=WeightFormat.INT4, symmetric=True, group_size=32, awq=True, scale_estimation=True
            )
        )
    else:
        model, options = mlp_with_attention_matmul(), CompileOptions(preset=Preset.TRANSFORMER)
    feeds = random_feeds(model, batches=6) if mode != "int4-awq-se" else _decoder_feeds()
    onnx_path, xml_path = _as_openvino_ir(model, tmp_path)
    results = {
        path.suffix: qcompiler.compile(path, "openvino-cpu", options, data=feeds, progress=False)
        for path in (onnx_path, xml_path)
    }
    from_ir = results[".xml"]
    assert {node.domain for node in from_ir.model.graph} >= {"", "org.openvinotoolkit"}
    if mode == "int4-awq-se":
        assert from_ir.report.compression["awq"].keys() == results[".onnx"].report.compression["awq"].keys()
        assert len(decompressions(from_ir.artifact)) == len(decompressions(results[".onnx"].artifact)) == 5
    else:
        kinds = [
            collections.Counter(op.get_type_name() for op in r.artifact.get_ordered_ops())
            for r in results.values()
        ]
        assert kinds[0]["FakeQuantize"] == kinds[1]["FakeQuantize"] > 0
    core = ov.Core()
    reference = core.compile_model(str(xml_path), "CPU", EXACT)
    outputs = {}
    for suffix, result in results.items():
        compiled = core.compile_model(result.artifact, "CPU", EXACT)
        outputs[suffix] = [compiled(feed)[0] for feed in feeds]
    errors = {
        suffix: np.mean(
            [np.abs(a - reference(feed)[0]).mean() for a, feed in zip(values, feeds, strict=True)]
        )
        for suffix, values in outputs.items()
    }
    assert errors[".xml"] > 0 and abs(errors[".xml"] - errors[".onnx"]) <= 0.01 * errors[".onnx"]


def _decoder_feeds(count: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"ids": rng.integers(0, 40, (2, 12))} for _ in range(count)]


def test_openvino_ir_compiles_for_openvino_targets_only(tmp_path, capsys):
    path = _saved(_small_openvino_model(), tmp_path / "m.xml")
    assert main([str(path), "--target", "ort-cpu", "--weights", "int8"]) != 0
    error = capsys.readouterr().err
    assert "m.xml" in error and "openvino-cpu/gpu/npu only" in error


def test_openvino_ir_without_its_weights_or_already_quantized_is_refused(tmp_path):
    path = _saved(_small_openvino_model(), tmp_path / "m.xml")
    path.with_suffix(".bin").unlink()
    with pytest.raises(qcompiler.errors.ModelLoadError, match=r"m.xml: its weights file m.bin is missing"):
        qcompiler.load(path)
    x = ops.parameter([2, 8], ov.Type.f32, name="x")
    weight = ops.constant(np.ones((4, 8), np.float32))
    quantized = _saved(
        ov.Model([ops.matmul(_fq(x, -1.0, 1.0), weight, False, True)], [x]), tmp_path / "q.xml"
    )
    with pytest.raises(qcompiler.errors.UnsupportedModelError, match="already quantized .* FakeQuantize"):
        qcompiler.compile(quantized, "openvino-cpu", _weights_only("int8", True, 0), progress=False)


def test_w8a8_stores_embedding_tables_int8_on_openvino_only():
    """OpenVINO targets keep the Gather tables INT8 (weight-only) in a W8A8 model, as NNCF does;
    onnxruntime's W8A8 leaves them float."""
    feeds = _decoder_feeds(6)
    options = CompileOptions(preset=Preset.TRANSFORMER)
    result = qcompiler.compile(tiny_decoder(), "openvino-cpu", options, data=feeds, progress=False)
    assert result.report.compression["layers"]["embed"]["how"] == "int8 asym per-channel; rtn"
    gathers = [item for item in decompressions(result.artifact) if item.reader_type == "Gather"]
    assert [item.element_type for item in gathers] == ["u8"]
    onnxruntime = qcompiler.compile(tiny_decoder(), "ort-cpu", options, data=feeds, progress=False)
    assert not onnxruntime.report.compression
    assert [n.op_type for n in onnxruntime.model.graph if n.op_type == "Gather"] == ["Gather"]
    table = onnxruntime.model.graph.node("embed").inputs[0]
    assert table.const_value is not None and table.dtype == ir.DataType.FLOAT


def test_embedding_tables_are_compressed_after_the_static_calibration_run():
    """A blocked INT8 table (a DequantizeLinear with block_size, opset 21) must not reach
    onnxruntime's static calibration of an opset-17 model: without SmoothQuant the ranges come from
    that run, which used to fail on the compressed table."""
    rng = np.random.default_rng(2)
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", 6]))
    graph = ir.Graph([ids], [], nodes=[], name="embedding_then_matmul")
    table = const(graph, "table", rng.standard_normal((40, 256)).astype(np.float32))
    hidden = add(graph, "Gather", [table, ids], "embed")
    graph.outputs.append(
        add(
            graph,
            "MatMul",
            [hidden, const(graph, "w", rng.standard_normal((256, 8)).astype(np.float32))],
            "fc",
        )
    )
    options = CompileOptions(
        preset=Preset.TRANSFORMER, smooth_quant=qcompiler.SmoothQuantOptions(enabled=False)
    )
    feeds = [{"ids": rng.integers(0, 40, (2, 6))} for _ in range(4)]
    result = qcompiler.compile(model_of(graph), "openvino-cpu", options, data=feeds, progress=False)
    assert result.report.compression["layers"]["embed"]["how"] == "int8 asym group 128; rtn"
    assert result.report.data["calibration_runs"] == 1 and len(result.report.activation_quantizers) == 1


def test_attention_query_and_key_reach_openvino_as_symmetric_fake_quantize_before_reshape():
    """On the artifact: a FakeQuantize between each of Q's and K's bias Add and its Reshape, with a
    signed symmetric range [-128 s, 127 s]; the weighted MatMuls keep theirs; V has none."""
    from tests.test_placement import _attention_block

    model = _attention_block()
    result = qcompiler.compile(
        model,
        "openvino-cpu",
        CompileOptions(preset=Preset.TRANSFORMER),
        data=random_feeds(model, batches=4),
        progress=False,
    )
    hoisted = []
    for op in result.artifact.get_ordered_ops():
        if op.get_type_name() != "FakeQuantize":
            continue
        readers = {target.get_node().get_type_name() for target in op.output(0).get_target_inputs()}
        if readers == {"Reshape"}:
            low, high = (float(op.input_value(i).get_node().get_data().reshape(())) for i in (1, 2))
            assert op.input_value(0).get_node().get_type_name() == "Add"
            assert low == pytest.approx(-high * 128 / 127, rel=1e-5)
            hoisted.append(op)
    assert len(hoisted) == 2
    assert (
        collections.Counter(op.get_type_name() for op in result.artifact.get_ordered_ops())["FakeQuantize"]
        == 3
    )


def test_a_compressed_matmul_fused_with_its_bias_passes_the_runtime_check():
    """OpenVINO 2026.4 names a FullyConnected fused with its bias Add after the Add only: the
    checker finds the MatMul's runtime node through its reader (it reported MiniLM's 36 INT4
    weights as decompressed)."""
    rng = np.random.default_rng(0)
    x = float_input("x", ["batch", 4, 256])
    graph = ir.Graph([x], [], nodes=[], name="fc_bias")
    y = add(graph, "MatMul", [x, const(graph, "w", rng.standard_normal((256, 128)).astype(np.float32))], "fc")
    graph.outputs.append(add(graph, "Add", [y, const(graph, "b", np.ones(128, np.float32))], "bias"))
    result = qcompiler.compile(
        model_of(graph), "openvino-cpu", _weights_only("int4", False, 128), progress=False
    )
    (found,) = decompressions(result.artifact)
    assert found.element_type == "u4" and found.reader == "fc"
    compiled = ov.Core().compile_model(result.artifact, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    fused = runtime_precisions(compiled)
    assert "fc" not in fused and any("u4" in types for types in fused.values())  # named after the Add
