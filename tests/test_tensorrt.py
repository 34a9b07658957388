"""`--target tensorrt` on graphs built here: FP16 conversion, INT8 / FP8 W8A8, INT4 weight-only, CPU verification."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import qcompiler
from qcompiler.backends.tensorrt import legality
from qcompiler.errors import OptionError, UnsupportedModelError
from qcompiler.float16_compute import kept_float32, to_float16
from qcompiler.numerics import FP8_MAX, dequantize, quantize
from qcompiler.options import QuantType
from tests.graphs import add, const, float_input, mlp_with_attention_matmul, model_of, random_feeds, run

FP16, FP32 = ir.DataType.FLOAT16, ir.DataType.FLOAT


def _fp32_outputs(model: ir.Model) -> int:
    """How many node outputs the graph computes in FP32."""
    return sum(output.dtype == FP32 for node in model.graph for output in node.outputs)


def _rotary_norm_model() -> ir.Model:
    """positions (int64) -> Cast -> Mul(inv_freq) -> Cos -> Mul(x), and x -> RMSNorm -> MatMul.

    The integer-valued rotary angles and the RMSNorm's squares are what FP16 cannot hold.
    """
    rng = np.random.default_rng(3)
    x = float_input("x", [2, 16])
    positions = ir.Value(name="positions", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([2, 16]))
    graph = ir.Graph([x, positions], [], nodes=[], name="rotary_norm")
    angle = add(graph, "Cast", [positions], "to_float", to=FP32)
    scaled = add(graph, "Mul", [angle, const(graph, "inv_freq", np.float32(0.37))], "angles")
    cos = add(graph, "Cos", [scaled], "cos")
    rotated = add(graph, "Mul", [x, cos], "rotate")
    squares = add(graph, "Pow", [rotated, const(graph, "two", np.float32(2.0))], "pow")
    mean = add(graph, "ReduceMean", [squares, const(graph, "axes", np.array([-1]))], "mean", keepdims=1)
    eps = add(graph, "Add", [mean, const(graph, "eps", np.float32(1e-6))], "add_eps")
    root = add(graph, "Sqrt", [eps], "sqrt")
    normed = add(graph, "Div", [rotated, root], "normalize")
    weight = const(graph, "w", rng.standard_normal((16, 8)).astype(np.float32))
    y = add(graph, "MatMul", [normed, weight], "proj")
    y.shape = ir.Shape([2, 8])
    graph.outputs.append(y)
    return _typed(model_of(graph, 19))


def _typed(model: ir.Model) -> ir.Model:
    """Types on every value (what the pipeline's normalization gives a model)."""
    return ir.passes.common.ShapeInferencePass()(model).model


def _feed() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {
        "x": (rng.standard_normal((2, 16)) * 800).astype(np.float32),  # squares reach 6e5 > FP16's 65504
        "positions": rng.integers(2048, 8192, (2, 16)).astype(np.int64),  # past FP16's exact integers
    }


def test_float16_keeps_integer_valued_and_squared_tensors_float32():
    model = _rotary_norm_model()
    kept = {str(node.name): reason for node, reason in kept_float32(model).items()}
    assert kept == {
        "to_float": "integer-valued",
        "angles": "integer-valued",
        "cos": "integer-valued",
        "pow": "squares",
        "mean": "squares",
        "add_eps": "squares",
        "sqrt": "squares",
    }
    expected = run(model, _feed())[0]
    report = to_float16(model)
    assert report.casts == 4  # x, cos and sqrt down to FP16; the rotated x up into Pow
    graph = model.graph
    assert graph.inputs[0].dtype == FP32 and graph.outputs[0].dtype == FP32  # the interface keeps its types
    assert next(n for n in graph if n.name == "proj").outputs[0].dtype == FP16
    assert graph.initializers["w"].dtype == FP16
    got = run(model, _feed())[0]
    assert np.all(np.isfinite(got))
    relative = np.abs(got - expected).max() / np.abs(expected).max()
    assert relative < 3e-3, relative


def test_naive_float16_would_break_the_same_graph():
    """The reference for the test above: every tensor FP16 overflows the squares and rounds the angles."""
    feed = _feed()
    x = feed["x"].astype(np.float16)
    angles = feed["positions"].astype(np.float16) * np.float16(0.37)
    rotated = x * np.cos(angles)
    with np.errstate(over="ignore"):
        squares = rotated * rotated
    assert not np.all(np.isfinite(squares))


def test_float16_shape_math_and_resize_scales_stay_float32():
    x = float_input("x", [1, 2, 4, 4])
    graph = ir.Graph([x], [], nodes=[], name="shapes")
    shape = add(graph, "Shape", [x], "shape")
    as_float = add(graph, "Cast", [shape], "shape_float", to=FP32)
    halved = add(graph, "Div", [as_float, const(graph, "two", np.float32(2.0))], "halve")
    add(graph, "Cast", [halved], "back_to_int", to=ir.DataType.INT64)
    scales = const(graph, "scales", np.array([1, 1, 2, 2], np.float32))
    resized = add(graph, "Resize", [x, const(graph, "roi", np.zeros(0, np.float32)), scales], "resize")
    resized.shape = ir.Shape([1, 2, 8, 8])
    graph.outputs.append(resized)
    model = _typed(model_of(graph, 19))
    to_float16(model)
    resize = next(n for n in model.graph if n.name == "resize")
    assert resize.inputs[2].dtype == FP32 and resize.outputs[0].dtype == FP16
    assert next(n for n in model.graph if n.name == "halve").outputs[0].dtype == FP32


def _compile(model: ir.Model, target: str = "tensorrt", **options) -> qcompiler.CompileResult:
    return qcompiler.compile(
        model, target, qcompiler.CompileOptions(**options), data=random_feeds(model, 4), progress=False
    )


def _nodes(model: ir.Model, op_type: str) -> list[ir.Node]:
    return [node for node in model.graph if node.op_type == op_type]


def test_int8_w8a8_is_strongly_typed_symmetric_and_stores_int8_weights():
    float_model = _mlp((256, 128, 64, 32))
    result = _compile(float_model, preset=qcompiler.Preset.TRANSFORMER)
    model = result.model
    assert any("activations made symmetric" in line for line in result.report.warnings)
    quantizers = _nodes(model, "QuantizeLinear")
    assert quantizers and all(q.inputs[2].dtype == ir.DataType.INT8 for q in quantizers)
    assert all(not q.inputs[2].const_value.numpy().any() for q in quantizers)
    assert all(q.inputs[0].dtype == FP16 and q.inputs[1].dtype == FP16 for q in quantizers)
    weights = [dq for dq in _nodes(model, "DequantizeLinear") if dq.inputs[0].const_value is not None]
    assert len(weights) == 3 and all(dq.inputs[0].dtype == ir.DataType.INT8 for dq in weights)
    assert all(dq.inputs[0].producer() is None for dq in weights)  # an initializer, never FP weight + Q
    assert all(m.outputs[0].dtype == FP16 for m in _nodes(model, "MatMul"))
    assert not [v for v in model.graph.initializers.values() if v.dtype == FP32 and v.const_value.size > 1]
    assert model.opset_imports[""] >= 19 and model.ir_version >= 9
    assert legality.problems_of(model, strongly_typed=True) == []
    # executed on CPU: the same quantizers as an ort-cpu compile with symmetric int8 activations;
    # FP16 rounding before a quantizer may move a code by one step: far below the quantization error
    reference = _compile(
        float_model,
        "ort-cpu",
        preset=qcompiler.Preset.TRANSFORMER,
        activations=qcompiler.ActivationOptions(dtype=QuantType.INT8, symmetric=True),
    ).model
    for feed in random_feeds(float_model, 2, seed=9):
        got, expected, exact = run(model, feed)[0], run(reference, feed)[0], run(float_model, feed)[0]
        assert np.abs(got - expected).max() <= 0.03 * np.abs(expected).max()
        assert np.abs(got - expected).mean() <= 0.1 * np.abs(expected - exact).mean()


def test_fp8_w8a8_uses_fp8_codes_and_scales_from_fp8_ranges():
    float_model = _mlp()
    result = _compile(
        float_model,
        preset=qcompiler.Preset.TRANSFORMER,
        activations=qcompiler.ActivationOptions(dtype=QuantType.FP8),
        smooth_quant=qcompiler.SmoothQuantOptions(enabled=False),
    )
    model = result.model
    quantizers = _nodes(model, "QuantizeLinear")
    assert quantizers and all(q.inputs[2].dtype == ir.DataType.FLOAT8E4M3FN for q in quantizers)
    for q in quantizers:  # the scale maps the calibrated absmax to 448, not 127
        params = result.report.activation_quantizers[str(q.inputs[0].name).removesuffix("_float16")]
        absmax = max(-params["lo"], params["hi"])
        assert float(q.inputs[1].const_value.numpy()) == pytest.approx(absmax / FP8_MAX, rel=1e-3)
    weight = next(dq for dq in _nodes(model, "DequantizeLinear") if dq.inputs[0].const_value is not None)
    assert weight.inputs[0].dtype == ir.DataType.FLOAT8E4M3FN
    fc1 = float_model.graph.initializers["w0"].const_value.numpy()
    expected_scales = np.abs(fc1).max(axis=0) / FP8_MAX
    np.testing.assert_allclose(
        weight.inputs[1].const_value.numpy().astype(np.float32), expected_scales, rtol=1e-3
    )
    assert legality.problems_of(model, strongly_typed=True) == []
    feed = random_feeds(float_model, 1, seed=2)[0]
    got, expected = run(model, feed)[0], run(float_model, feed)[0]
    assert np.abs(got - expected).max() <= 0.15 * np.abs(expected).max()


def test_fp8_quantize_matches_onnxruntime_bit_for_bit():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4096) * 3).astype(np.float32)
    x[:4] = [1.0625, 1.1875, 1e6, -1e6]  # ties to even (1.0, 1.25), saturation
    scale = np.float32(0.01)
    ours = quantize(x, scale, 0, QuantType.FP8)
    graph = ir.Graph([float_input("x", [4096])], [], nodes=[], name="q8")
    q = add(
        graph,
        "QuantizeLinear",
        [
            graph.inputs[0],
            const(graph, "s", scale),
            const(graph, "z", np.asarray(0, ml_dtypes.float8_e4m3fn)),
        ],
        "q",
    )
    q.type, q.shape = ir.TensorType(ir.DataType.FLOAT8E4M3FN), ir.Shape([4096])
    y = add(graph, "DequantizeLinear", [q, graph.initializers["s"], graph.initializers["z"]], "dq")
    y.type, y.shape = ir.TensorType(FP32), ir.Shape([4096])
    graph.outputs.append(y)
    model = model_of(graph, 19)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    (runtime,) = session.run(None, {"x": x})
    np.testing.assert_array_equal(dequantize(ours, scale, 0), runtime)


def test_fp8_closed_form_rounding_and_saturation():
    codes = quantize(
        np.array([1.0625, 1.1875, 500.0, -1e9, 0.0], np.float32), np.float32(1.0), 0, QuantType.FP8
    )
    assert codes.astype(np.float32).tolist() == [1.0, 1.25, 448.0, -448.0, 0.0]


def _mlp(widths: tuple[int, ...] = (256, 128, 64)) -> ir.Model:
    """x -> MatMul -> Relu -> MatMul: weights wide enough for INT4 blocks of 64."""
    rng = np.random.default_rng(7)
    x = float_input("x", ["batch", widths[0]])
    graph = ir.Graph([x], [], nodes=[], name="mlp")
    h = x
    for index, (rows, columns) in enumerate(zip(widths, widths[1:], strict=False)):
        weight = const(
            graph, f"w{index}", (rng.standard_normal((rows, columns)) / rows**0.5).astype(np.float32)
        )
        h = add(graph, "MatMul", [h, weight], f"fc{index}")
        if index < len(widths) - 2:
            h = add(graph, "Relu", [h], f"relu{index}")
    graph.outputs.append(h)
    return _typed(model_of(graph, 17))


def test_int4_weight_only_keeps_blocked_dq_with_float16_scales():
    float_model = _mlp()
    weights = qcompiler.CompressionOptions(
        format=qcompiler.WeightFormat.INT4, group_size=32, backup_layers=False
    )
    result = qcompiler.compile(
        float_model, "tensorrt", qcompiler.CompileOptions(compression=weights), progress=False
    )
    assert any("--group-size 32 is not a block size" in line for line in result.report.warnings)
    assert any("made symmetric" in line for line in result.report.warnings)
    model = result.model
    blocked = [dq for dq in _nodes(model, "DequantizeLinear") if dq.attributes.get_int("block_size", 0)]
    assert blocked, "no blocked weight"
    for dq in blocked:
        assert dq.inputs[0].dtype == ir.DataType.INT4 and len(dq.inputs) == 2  # symmetric: no zero point
        assert dq.attributes.get_int("axis", 1) == 0 and dq.inputs[1].dtype == FP16
        assert next(iter(dq.outputs[0].uses())).node.op_type == "MatMul"
    assert model.opset_imports[""] >= 21 and model.ir_version >= 10
    assert legality.problems_of(model, strongly_typed=True) == []
    assert _fp32_outputs(model) <= 2  # the interface Casts
    feed = random_feeds(float_model, 1, seed=4)[0]
    assert all(np.all(np.isfinite(output)) for output in run(model, feed))


def test_tiny_gemms_and_gemv_stay_float_with_their_reason():
    small = _mlp((256, 128, 8))  # N = 8 < 16
    result = _compile(small, preset=qcompiler.Preset.TRANSFORMER)
    reason = "GEMM too small for the target's kernels (K = 128, N = 8; both must be >= 16)"
    assert result.report.nodes["skipped"] == {"fc1": reason}
    assert (
        next(n for n in result.model.graph if n.name == "fc1").metadata_props["qcompiler.skipped"] == reason
    )
    assert result.report.nodes["quantized"] == 1
    gemv = _mlp()
    gemv.graph.inputs[0].shape = ir.Shape([1, 256])
    gemv = _typed(gemv)
    with pytest.raises(UnsupportedModelError, match=r"2 of 2 candidate nodes skipped because GEMV \(M = 1\)"):
        _compile(gemv, preset=qcompiler.Preset.TRANSFORMER)


def test_activation_types_a_target_does_not_run_are_refused():
    with pytest.raises(OptionError, match="--activation-type uint8: tensorrt runs fp8, int8 activations"):
        _compile(mlp_with_attention_matmul(), activations=qcompiler.ActivationOptions(dtype=QuantType.UINT8))
    with pytest.raises(OptionError, match="--activation-type fp8: ort-cpu runs int8, uint8 activations"):
        _compile(
            mlp_with_attention_matmul(),
            "ort-cpu",
            activations=qcompiler.ActivationOptions(dtype=QuantType.FP8),
        )


def test_nvfp4_weights_are_two_chained_dqs_that_onnx_reference_computes_like_our_cpu_twin():
    from onnx.reference import ReferenceEvaluator

    from qcompiler.backends.tensorrt.verification import as_artifact
    from qcompiler.registry import backend_named

    float_model = _mlp()
    weights = qcompiler.CompressionOptions(format=qcompiler.WeightFormat.NVFP4, backup_layers=False)
    model = qcompiler.compile(
        float_model, "tensorrt", qcompiler.CompileOptions(compression=weights), progress=False
    ).model
    assert model.opset_imports[""] == 23 and model.ir_version >= 11
    assert legality.problems_of(model, strongly_typed=True) == []
    for matmul in _nodes(model, "MatMul"):
        dq = matmul.inputs[1].producer()
        assert dq.op_type == "DequantizeLinear" and dq.inputs[0].dtype == ir.DataType.FLOAT4E2M1
        assert dq.attributes.get_int("axis", 1) == 0 and dq.attributes.get_int("block_size", 0) == 16
        scales = dq.inputs[1].producer()  # E4M3 block scales x the FP32 tensor scale, out in FP16
        assert scales.inputs[0].dtype == ir.DataType.FLOAT8E4M3FN and scales.inputs[1].dtype == FP32
        assert scales.attributes.get_int("output_dtype", 0) == FP16 and dq.outputs[0].dtype == FP16
    feed = random_feeds(float_model, 1, seed=3)[0]
    reference = ReferenceEvaluator(ir.to_proto(model)).run(None, feed)[0].astype(np.float32)
    assert not any(n.inputs[0].dtype == ir.DataType.FLOAT4E2M1 for n in as_artifact(model).graph if n.inputs)
    (ours,) = backend_named("tensorrt").runner(model).run([model.graph.outputs[0].name], feed)
    np.testing.assert_allclose(ours.astype(np.float32), reference, atol=2e-3 * np.abs(reference).max())
    exact = run(float_model, feed)[0]
    assert (
        np.abs(reference - exact).mean() < 0.15 * np.abs(exact).mean()
    )  # NVFP4's own error, not a broken graph


@pytest.mark.parametrize("dtype", [QuantType.INT8, QuantType.FP8])
def test_max_drop_measures_tensorrt_candidates_as_fp16_artifacts(monkeypatch, dtype):
    from qcompiler.backends.tensorrt import verification

    measured: list[bool] = []
    convert = verification.to_float16
    monkeypatch.setattr(verification, "to_float16", lambda model: measured.append(True) or convert(model))
    float_model = _mlp()
    options = qcompiler.CompileOptions(
        preset=qcompiler.Preset.TRANSFORMER,
        activations=qcompiler.ActivationOptions(dtype=dtype),
        accuracy=qcompiler.AccuracyOptions(max_drop=0.002, metric="cosine"),
    )
    result = qcompiler.compile(
        float_model,
        "tensorrt",
        options,
        data=random_feeds(float_model, 4),
        validation=random_feeds(float_model, 2, seed=8),
        progress=False,
    )
    assert result.report.fallback["met"] and measured  # every trial ran the FP16 artifact it would write
    assert legality.problems_of(result.model, strongly_typed=True) == []


def test_residual_add_input_is_quantized_so_the_add_fuses_into_its_conv():
    rng = np.random.default_rng(11)
    x = float_input("x", [1, 16, 8, 8])
    graph = ir.Graph([x], [], nodes=[], name="residual")
    weight = (rng.standard_normal((16, 16, 3, 3)) * 0.1).astype(np.float32)
    conv = add(
        graph,
        "Conv",
        [x, const(graph, "w", weight), const(graph, "b", np.zeros(16, np.float32))],
        "conv",
        pads=[1, 1, 1, 1],
    )
    summed = add(graph, "Add", [conv, x], "residual_add")
    relu = add(graph, "Relu", [summed], "relu")
    weight2 = (rng.standard_normal((16, 16, 1, 1)) * 0.1).astype(np.float32)
    out = add(
        graph,
        "Conv",
        [relu, const(graph, "w2", weight2), const(graph, "b2", np.zeros(16, np.float32))],
        "conv2",
    )
    out.shape = ir.Shape([1, 16, 8, 8])
    graph.outputs.append(out)
    model = _typed(model_of(graph, 17))
    result = _compile(model)
    assert result.report.nodes["by_op_type"] == {"Conv": 2, "Add": 1}
    residual = next(node for node in result.model.graph if node.name == "residual_add")
    assert residual.inputs[0].producer().op_type == "Conv"  # the fused side stays the Conv's own output
    assert residual.inputs[1].producer().op_type == "DequantizeLinear"
    assert legality.problems_of(result.model, strongly_typed=True) == []
    # ort-cpu plans no residual quantizer
    assert _compile(model, "ort-cpu").report.nodes["by_op_type"] == {"Conv": 2}
