"""SmoothQuant folding is exact in float, for each producer kind, and refuses with a reason."""

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401 - ir.passes.common
import pytest

from qcompiler.options import QuantType
from qcompiler.rewrites.smoothing import SMOOTHQUANT_KEY, ApplySmoothingPass, find_groups
from qcompiler.rewrites.smoothquant import choose_alpha, smoothing_scales
from tests.graphs import ORT_RUNNERS, add, const, float_input, model_of, run

C = 16


def _weight(graph, name, shape, seed):
    return const(graph, name, np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _two_consumers(graph, activation):
    """Q and K style consumers sharing one activation (MatMul and Gemm transB)."""
    q = add(graph, "MatMul", [activation, _weight(graph, "wq", (C, 8), 1)], "q_proj")
    k = add(graph, "Gemm", [activation, _weight(graph, "wk", (8, C), 2)], "k_proj", transB=1)
    graph.outputs.extend([q, k])


def _layer_norm(graph, x):
    """LayerNormalization 'ln' over the last axis with constant gamma and beta."""
    return add(
        graph,
        "LayerNormalization",
        [x, _weight(graph, "gamma", (C,), 3), _weight(graph, "beta", (C,), 4)],
        "ln",
        axis=-1,
    )


def layer_norm_model():
    x = float_input("x", [5, C])
    graph = ir.Graph([x], [], nodes=[], name="ln")
    h = _layer_norm(graph, x)
    _two_consumers(graph, h)
    return model_of(graph)


def rms_norm_model():
    x = float_input("x", [5, C])
    graph = ir.Graph([x], [], nodes=[], name="rms")
    square = add(graph, "Mul", [x, x], "square")
    mean = add(graph, "ReduceMean", [square], "mean", axes=[-1])
    eps = add(graph, "Add", [mean, const(graph, "eps", np.float32(1e-6))], "eps_add")
    root = add(graph, "Sqrt", [eps], "sqrt")
    normed = add(graph, "Div", [x, root], "div")
    h = add(graph, "Mul", [normed, _weight(graph, "rms_weight", (C,), 5)], "rms_scale")
    _two_consumers(graph, h)
    return model_of(graph)


def decomposed_layer_norm_model():
    """LayerNorm as OpenVINO IR spells it: MVN -> Mul gamma -> Add beta (MVN here: x - mean)."""
    x = float_input("x", [5, C])
    graph = ir.Graph([x], [], nodes=[], name="mvn")
    centered = add(graph, "Sub", [x, add(graph, "ReduceMean", [x], "mean", axes=[-1])], "mvn")
    scaled = add(graph, "Mul", [centered, _weight(graph, "gamma", (C,), 3)], "gamma")
    h = add(graph, "Add", [scaled, _weight(graph, "beta", (C,), 4)], "beta")
    _two_consumers(graph, h)
    return model_of(graph)


def biased_matmul_model():
    x = float_input("x", [5, 12])
    graph = ir.Graph([x], [], nodes=[], name="mm")
    m = add(graph, "MatMul", [x, _weight(graph, "w0", (12, C), 6)], "fc0")
    h = add(graph, "Add", [m, _weight(graph, "b0", (C,), 7)], "fc0_bias")
    _two_consumers(graph, h)
    return model_of(graph)


def gemm_bias_model():
    x = float_input("x", [5, 12])
    graph = ir.Graph([x], [], nodes=[], name="gemm")
    h = add(
        graph, "Gemm", [x, _weight(graph, "w0", (C, 12), 6), _weight(graph, "b0", (C,), 7)], "fc0", transB=1
    )
    _two_consumers(graph, h)
    return model_of(graph)


def residual_model():
    """LayerNorm output feeds the consumers *and* a residual Add: cannot fold, Mul inserted."""
    x = float_input("x", [5, C])
    graph = ir.Graph([x], [], nodes=[], name="residual")
    h = _layer_norm(graph, x)
    _two_consumers(graph, h)
    graph.outputs.append(add(graph, "Add", [h, x], "residual"))
    return model_of(graph)


def graph_input_model():
    x = float_input("x", [5, C])
    graph = ir.Graph([x], [], nodes=[], name="input")
    _two_consumers(graph, x)
    return model_of(graph)


def _typed(model):
    """Hand-built graphs carry no inferred types; the pipeline's normalize step provides them."""
    ir.passes.common.ShapeInferencePass()(model)
    return model


def _apply(model, seed=0):
    groups = [
        group for group in find_groups(_typed(model)) if any(n.name == "q_proj" for n in group.consumers)
    ]
    scales = np.random.default_rng(seed).uniform(0.1, 10.0, C).astype(np.float32)
    smoothing = ApplySmoothingPass([(group, scales, "alpha=test") for group in groups])
    smoothing(model)
    return groups, smoothing.outcomes


@pytest.mark.parametrize(
    "builder, expected",
    [
        (layer_norm_model, "folded into LayerNormalization 'ln'"),
        (rms_norm_model, "folded into Mul 'rms_scale'"),
        (biased_matmul_model, "folded into Add 'fc0_bias'"),
        (decomposed_layer_norm_model, "folded into Add 'beta'"),
        (gemm_bias_model, "folded into Gemm 'fc0'"),
        (residual_model, "Mul inserted (it also feeds Add 'residual' unscaled)"),
        (graph_input_model, "Mul inserted (the activation is a graph input)"),
    ],
)
def test_smoothing_alone_is_exact(builder, expected):
    """Outputs change by < 1e-5 relative; the report says how 1/s was applied."""
    reference = builder()
    model = builder()
    feed = {
        "x": np.random.default_rng(9)
        .standard_normal(reference.graph.inputs[0].shape.numpy())
        .astype(np.float32)
    }
    before = run(reference, feed)
    groups, outcomes = _apply(model)
    assert len(groups) == 1 and len(groups[0].consumers) == 2  # Q and K share one scale vector
    assert list(outcomes.values()) == [expected]
    after = run(model, feed)
    for a, b in zip(before, after, strict=True):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    assert all(SMOOTHQUANT_KEY in node.metadata_props for node in groups[0].consumers)
    assert sum(node.op_type == "Mul" and "SmoothQuant" in str(node.name) for node in model.graph) == (
        "Mul inserted" in expected
    )


def test_shared_weight_outside_the_group_is_copied():
    """A weight also read by an unsmoothed node keeps its original values for that node."""
    x = float_input("x", [5, C])
    graph = ir.Graph([x], [], nodes=[], name="shared")
    h = _layer_norm(graph, x)
    w = _weight(graph, "w", (C, 8), 1)
    graph.outputs.append(add(graph, "MatMul", [h, w], "smoothed"))
    graph.outputs.append(add(graph, "MatMul", [x, w], "plain"))
    reference = model_of(graph)
    model = reference.clone()
    feed = {"x": np.random.default_rng(1).standard_normal((5, C)).astype(np.float32)}
    before = run(reference, feed)
    groups = [g for g in find_groups(_typed(model)) if g.activation.name == "ln_out"]
    ApplySmoothingPass([(groups[0], np.linspace(0.5, 4, C).astype(np.float32), "alpha=test")])(model)
    after = run(model, feed)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    plain = next(node for node in model.graph if node.name == "plain")
    assert plain.inputs[1].name == "w"


def test_smoothing_scales_closed_form():
    """alpha 0.5: s = sqrt(max|X| / max|W|); zero channels keep 1."""
    scales = smoothing_scales(np.array([4.0, 9.0, 0.0]), np.array([1.0, 4.0, 2.0]), 0.5)
    np.testing.assert_allclose(scales, [2.0, 1.5, 1.0])


def test_alpha_search_helps_outlier_channels_and_leaves_flat_ones():
    """An activation with one huge channel gets smoothed; a flat one is left alone (alpha None)."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((C, 32)).astype(np.float32)
    flat = rng.standard_normal((256, C)).astype(np.float32)
    spiky = flat.copy()
    spiky[:, 3] *= 80.0
    spiky_choice = choose_alpha(
        spiky, spiky.min(0), spiky.max(0), [weight], (0.3, 0.5, 0.7, 0.9), QuantType.UINT8, symmetric=False
    )
    assert (
        spiky_choice.alpha is not None
        and spiky_choice.errors[f"{spiky_choice.alpha:g}"] < 0.5 * spiky_choice.errors["none"]
    )
    flat_choice = choose_alpha(
        flat, flat.min(0), flat.max(0), [weight], (0.9,), QuantType.UINT8, symmetric=False
    )
    assert flat_choice.alpha == 0.9  # a single alpha is forced, whatever its error


def swiglu_model():
    """down_proj(silu(gate(x)) * up(x)): 1/s folds into up_proj's weight columns."""
    x = float_input("x", [5, 12])
    graph = ir.Graph([x], [], nodes=[], name="swiglu")
    gate = add(graph, "MatMul", [x, _weight(graph, "w_gate", (12, C), 6)], "gate_proj")
    sig = add(graph, "Sigmoid", [gate], "sigmoid")
    silu = add(graph, "Mul", [gate, sig], "silu")
    up = add(graph, "MatMul", [x, _weight(graph, "w_up", (12, C), 7)], "up_proj")
    h = add(graph, "Mul", [silu, up], "glu")
    _two_consumers(graph, h)
    return model_of(graph)


def test_swiglu_product_folds_into_up_projection():
    """The product's scale goes into up_proj (silu's operand is read twice, so it is skipped); exact."""
    reference, model = _typed(swiglu_model()), _typed(swiglu_model())
    feed = {"x": np.random.default_rng(3).standard_normal((5, 12)).astype(np.float32)}
    before = run(reference, feed)
    _, outcomes = _apply(model)
    assert list(outcomes.values()) == ["folded into Mul 'glu'"]
    w_up = next(node for node in model.graph if node.name == "up_proj").inputs[1].const_value.numpy()
    assert not np.allclose(w_up, reference.graph.initializers["w_up"].const_value.numpy())
    for a, b in zip(before, run(model, feed), strict=True):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_pipeline_derives_quantizer_ranges_from_smoothquant_statistics():
    """With SmoothQuant and MinMax, one calibration run serves both steps, and the derived
    per-tensor range of X / s equals the range measured on the smoothed graph."""
    import qcompiler
    from qcompiler.calibration import StatKind, StatRequest, collect

    model = _typed(layer_norm_model())
    # One channel with outliers so SmoothQuant has something to do.
    feeds = [
        {
            "x": (np.random.default_rng(i).standard_normal((5, C)) * np.r_[40.0, np.ones(C - 1)]).astype(
                np.float32
            )
        }
        for i in range(4)
    ]
    options = qcompiler.CompileOptions(
        preset=qcompiler.Preset.TRANSFORMER, smooth_quant=qcompiler.SmoothQuantOptions(alpha=0.5)
    )
    result = qcompiler.compile(model, "ort-cpu", options, data=feeds, progress=False)
    assert result.report.data["calibration_runs"] == 1
    quantizer = result.report.activation_quantizers["ln_out"]
    # The QuantizeLinear's float input is the smoothed LayerNorm output, exact in the compiled graph.
    q = next(node for node in result.model.graph if node.op_type == "QuantizeLinear")
    measured = collect(
        result.model, [StatRequest(q.inputs[0], StatKind.MINMAX)], feeds, ORT_RUNNERS, progress=False
    ).minmax(q.inputs[0])
    assert quantizer["observed_lo"] == pytest.approx(measured[0], rel=1e-5)
    assert quantizer["observed_hi"] == pytest.approx(measured[1], rel=1e-5)


def test_scaled_weights_are_made_when_read_from_a_memory_mapped_model(tmp_path):
    """Scaled weights are lazy products of the original, which is unmapped once they are made."""
    model = rms_norm_model()
    path = tmp_path / "model.onnx"
    ir.save(model, path, external_data="model.onnx.data")
    loaded = ir.load(path)
    sources = {name: value.const_value for name, value in loaded.graph.initializers.items()}
    groups, _ = _apply(loaded)
    scaled = [node.inputs[1] for node in groups[0].consumers]
    for value in scaled:
        assert isinstance(value.const_value, ir.LazyTensor)
        source = sources[str(value.name)]
        assert isinstance(source, ir.ExternalTensor)
        first = value.const_value.numpy()
        assert source.raw is None  # read, scaled, unmapped
        np.testing.assert_array_equal(value.const_value.numpy(), first)  # made again the same
    feed = {
        "x": np.random.default_rng(3).standard_normal(model.graph.inputs[0].shape.numpy()).astype(np.float32)
    }
    for a, b in zip(run(model, feed), run(loaded, feed), strict=True):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
