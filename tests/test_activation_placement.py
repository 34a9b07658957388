"""Relu / Clip(0, 6) after a quantized Conv: the output quantizer takes the clamp's range and, where
its saturation does the clamp's work, the clamp is dropped (rewrites/activation_clamps.py)."""

import pathlib

import numpy as np
import onnx_ir as ir
import pytest
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

import qcompiler
from qcompiler.backends.onnxruntime.fusion import count_fusion
from qcompiler.drivers.runtimes import target_runners
from qcompiler.evaluation import model_outputs
from qcompiler.numerics import type_range
from qcompiler.options import ActivationOptions, CompileOptions
from qcompiler.options import QuantType as OurQuantType
from qcompiler.registry import backend_named
from qcompiler.rewrites.activation_clamps import makes_redundant
from qcompiler.rewrites.normalize import NormalizePass
from qcompiler.rewrites.placement import plan_quantizers
from qcompiler.targets import OPENVINO_CPU
from tests.graphs import add, const, float_input, model_of, op_types, run


def _conv(graph, x, name, rng, out_channels, in_channels, *, kernel=3, group=1, gain=1.0):
    weight = rng.standard_normal((out_channels, in_channels // group, kernel, kernel)).astype(np.float32)
    bias = rng.standard_normal(out_channels).astype(np.float32)
    pad = kernel // 2
    return add(
        graph,
        "Conv",
        [
            x,
            const(graph, f"{name}_w", (weight * gain / np.sqrt(weight[0].size)).astype(np.float32)),
            const(graph, f"{name}_b", bias),
        ],
        name,
        pads=[pad] * 4,
        group=group,
    )


def _clamp(graph, x, activation, name):
    if activation == "Relu":
        return add(graph, "Relu", [x], name)
    bounds = [
        const(graph, f"{name}_min", np.array(0, np.float32)),
        const(graph, f"{name}_max", np.array(6, np.float32)),
    ]
    return add(graph, "Clip", [x, *bounds], name)


def clamped_pair(activation: str, seed: int = 0) -> ir.Model:
    """Conv (pre-activation range about [-20, 20]) -> Relu or Clip(0, 6) -> Conv -> Sigmoid."""
    rng = np.random.default_rng(seed)
    x = float_input("image", ["batch", 4, 10, 10])
    graph = ir.Graph([x], [], nodes=[], name="pair")
    c = _conv(graph, x, "conv1", rng, 8, 4, gain=8.0)
    a = _clamp(graph, c, activation, "act")
    graph.outputs.append(add(graph, "Sigmoid", [_conv(graph, a, "conv2", rng, 8, 8, kernel=1)], "head"))
    return model_of(graph)


def inverted_residual(seed: int = 0, channels: int = 8, expand: int = 4) -> ir.Model:
    """A MobileNetV2 block: 1x1 expand + ReLU6 -> 3x3 depthwise + ReLU6 (per-channel gains over three
    decades, the hard case for per-tensor activations) -> 1x1 project -> residual Add -> 1x1 head
    -> global average pool."""
    rng = np.random.default_rng(seed)
    hidden = channels * expand
    x = float_input("image", ["batch", channels, 12, 12])
    graph = ir.Graph([x], [], nodes=[], name="mobilenet_block")
    e = _clamp(
        graph, _conv(graph, x, "expand", rng, hidden, channels, kernel=1, gain=3.0), "Clip", "expand_relu6"
    )
    depthwise = _conv(graph, e, "depthwise", rng, hidden, hidden, group=hidden, gain=1.0)
    weight = graph.initializers["depthwise_w"]
    gains = np.logspace(-1.5, 1.5, hidden).astype(np.float32)[rng.permutation(hidden)]
    weight.const_value = ir.tensor(
        weight.const_value.numpy() * gains[:, None, None, None], name="depthwise_w"
    )
    d = _clamp(graph, depthwise, "Clip", "depthwise_relu6")
    p = _conv(graph, d, "project", rng, channels, hidden, kernel=1, gain=0.5)
    r = add(graph, "Add", [p, x], "residual")
    head = _conv(graph, r, "head", rng, 16, channels, kernel=1)
    graph.outputs.append(add(graph, "GlobalAveragePool", [head], "pool"))
    return model_of(graph)


def _feeds(model: ir.Model, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shape = [1 if not isinstance(dim, int) else dim for dim in model.graph.inputs[0].shape]
    return [{"image": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def _compile(model, feeds, **options):
    result = qcompiler.compile(
        model.clone(), "ort-cpu", CompileOptions(**options), data=feeds, progress=False
    )
    return result.model


def _quantizer_of(model: ir.Model, tensor: str) -> ir.Node:
    return next(
        node for node in model.graph if node.op_type == "QuantizeLinear" and node.inputs[0].name == tensor
    )


def _relative_error(reference: ir.Model, model: ir.Model, feeds) -> float:
    errors = [np.abs(run(model, feed)[0] - run(reference, feed)[0]).mean() for feed in feeds]
    scale = np.mean([np.abs(run(reference, feed)[0]).mean() for feed in feeds])
    return float(np.mean(errors) / scale)


@pytest.mark.parametrize("activation", ["Relu", "Clip"])
def test_clamp_range_goes_to_the_conv_output_quantizer_and_the_clamp_is_dropped(activation):
    """The Conv output's Q spans the clamp's output ([0, observed max], at most 6), zero point at the
    type's minimum; the clamp is gone, the tensor keeps its name, both Convs fuse into QLinearConv."""
    reference = clamped_pair(activation)
    calibration = _feeds(reference, 8, seed=1)
    model = _compile(reference, calibration)
    assert "Relu" not in op_types(model) and "Clip" not in op_types(model)
    q = _quantizer_of(model, "act_out")
    assert q.inputs[0].producer().name == "conv1"
    assert "saturation replaces act" in q.metadata_props["qcompiler.quantizer"]
    pre_activation = _observed_max(reference, "conv1_out", calibration)
    hi = pre_activation if activation == "Relu" else min(pre_activation, 6.0)
    assert pre_activation > 6.0  # the range the quantizer used to span: about [-20, 20]
    scale, zero_point = float(q.inputs[1].const_value.numpy()), int(q.inputs[2].const_value.numpy())
    assert zero_point == 0  # uint8 activations on ort-cpu
    np.testing.assert_allclose(scale * 255, hi, rtol=1e-6)
    report = count_fusion(model, ["conv1", "conv2"])
    assert report.fused == {"conv1": "QLinearConv", "conv2": "QLinearConv"}, report.not_fused


def test_symmetric_activations_keep_the_clamp_after_the_dequantize():
    """With symmetric quantizers the domain reaches below 0, so Relu stays (in float, after the DQ);
    the quantizer still spans the clamp output's range, mirrored: [-max, max], not the pre-activation's."""
    reference = clamped_pair("Relu")
    calibration = _feeds(reference, 8, seed=1)
    model = _compile(reference, calibration, activations=ActivationOptions(symmetric=True))
    relu = next(node for node in model.graph if node.op_type == "Relu")
    assert relu.inputs[0].producer().op_type == "DequantizeLinear"
    q = _quantizer_of(model, "conv1_out")
    observed = _observed_max(reference, "act_out", calibration)
    scale = float(q.inputs[1].const_value.numpy())
    np.testing.assert_allclose(scale * 127.5, observed, rtol=1e-5)  # uint8 symmetric: zero point 128
    held_out = _feeds(reference, 4, seed=2)
    assert _relative_error(reference, model, held_out) < 0.03  # measured 0.022 (asymmetric: 0.018)


def test_redundancy_is_onnxruntimes_rule():
    """Relu is redundant exactly when the zero point sits at the type's minimum; Clip(0, 6) also
    needs the top of the domain at or below 6 (a few float ulps of slack)."""
    qmin, qmax = type_range(OurQuantType.UINT8)
    assert makes_redundant((0.0, np.inf), 0.1, qmin, OurQuantType.UINT8)
    assert not makes_redundant((0.0, np.inf), 0.1, qmin + 1, OurQuantType.UINT8)
    assert makes_redundant((0.0, 6.0), np.float32(6.0 / 255), 0, OurQuantType.UINT8)
    assert not makes_redundant((0.0, 6.0), np.float32(6.1 / 255), 0, OurQuantType.UINT8)
    assert makes_redundant((0.0, np.inf), 0.1, -128, OurQuantType.INT8)
    assert not makes_redundant((0.0, np.inf), 0.1, 0, OurQuantType.INT8)


def test_openvino_quantizes_after_the_clamp_and_never_the_conv_output():
    """OpenVINO keeps the activation in float between quantizers: the only activation quantizers are
    the Conv inputs, i.e. after each ReLU6, as its low-precision transformations expect."""
    model = inverted_residual()
    NormalizePass()(model)
    plan = plan_quantizers(model, OPENVINO_CPU, CompileOptions())
    names = [str(value.name) for value in plan.activation_values()]
    assert names == ["image", "expand_relu6_out", "depthwise_relu6_out", "residual_out"]


def test_inverted_residual_block_matches_onnxruntime_quantize_static(tmp_path: pathlib.Path):
    """A MobileNetV2 block with random weights: both ReLU6 dropped into QLinearConv outputs, the residual
    Add in float; the output error against FP32 is no worse than onnxruntime's quantize_static (QDQ,
    U8S8, per-channel, MinMax) on the same graph and calibration data."""
    reference = inverted_residual()
    calibration, held_out = _feeds(reference, 16, seed=3), _feeds(reference, 8, seed=4)
    model = _compile(reference, calibration)
    assert op_types(model).count("Clip") == 0
    for tensor in ("expand_relu6_out", "depthwise_relu6_out"):
        q = _quantizer_of(model, tensor)
        assert q.inputs[0].producer().op_type == "Conv" and int(q.inputs[2].const_value.numpy()) == 0
        assert float(q.inputs[1].const_value.numpy()) * 255 <= 6.0 * (1 + 1e-6)
    residual = next(node for node in model.graph if node.op_type == "Add")
    assert residual.inputs[0].producer().op_type == "DequantizeLinear" and residual.inputs[1].name == "image"
    report = count_fusion(model, ["expand", "depthwise", "project", "head"])
    assert set(report.fused.values()) == {"QLinearConv"} and not report.not_fused
    ours = _relative_error(reference, model, held_out)
    peer = _relative_error(reference, _ort_quantize_static(reference, calibration, tmp_path), held_out)
    print(f"inverted residual: qcompiler {ours:.4f}, onnxruntime quantize_static {peer:.4f}")
    assert ours <= peer * 1.05, f"qcompiler {ours:.4f} vs onnxruntime quantize_static {peer:.4f}"
    assert ours < 0.05


def _observed_max(model: ir.Model, tensor: str, feeds) -> float:
    """The largest value the inner tensor `tensor` takes on `feeds` (FP32, onnxruntime)."""
    runners = target_runners(backend_named("onnxruntime"))
    return max(float(outputs[tensor].max()) for outputs in model_outputs(model, feeds, [tensor], runners))


class _Reader(CalibrationDataReader):
    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def _ort_quantize_static(model: ir.Model, feeds, folder: pathlib.Path) -> ir.Model:
    source, target = folder / "float.onnx", folder / "ort_qdq.onnx"
    ir.save(model, source)
    quantize_static(
        str(source),
        str(target),
        _Reader(feeds),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    return ir.load(target)
