import collections

import numpy as np
import pytest

from qcompiler import calibration
from qcompiler.backends.onnxruntime.backend import BACKEND as ort_backend
from qcompiler.backends.onnxruntime.fusion import count_fusion
from qcompiler.options import ActivationOptions, CompileOptions, Preset, QuantType
from qcompiler.rewrites.normalize import NormalizePass
from qcompiler.rewrites.placement import plan_quantizers
from qcompiler.rewrites.qdq import InsertQDQPass
from qcompiler.targets import ORT_CPU
from tests.graphs import ORT_RUNNERS, gemm_conv_model, mlp_with_attention_matmul, random_feeds, run


def _quantize(model, **options):
    NormalizePass()(model)
    reference = model.clone()
    compile_options = CompileOptions(**options).resolved()
    plan = plan_quantizers(model, ORT_CPU, compile_options)
    feeds = random_feeds(model, batches=4)
    stats = calibration.collect(
        model,
        plan.stat_requests(compile_options.activations.range_method),
        feeds,
        ORT_RUNNERS,
        progress=False,
    )
    result = InsertQDQPass(plan, stats, compile_options.activations, QuantType.UINT8)(model)
    return reference, model, plan, feeds, result


def _counts(model):
    return collections.Counter(node.op_type for node in model.graph)


def test_shared_activation_gets_one_q_and_dedicated_dqs():
    """Relu output feeds fc2 and fc3: one QuantizeLinear, one DequantizeLinear per consumer."""
    _, model, _, _, result = _quantize(mlp_with_attention_matmul(), preset=Preset.TRANSFORMER)
    assert result.modified
    q_nodes = [node for node in model.graph if node.op_type == "QuantizeLinear"]
    assert sorted(str(node.inputs[0].name) for node in q_nodes) == ["relu_out", "x"]
    relu_q = next(node for node in q_nodes if node.inputs[0].name == "relu_out")
    consumers = [use.node for use in relu_q.outputs[0].uses()]
    assert len(consumers) == 2 and all(node.op_type == "DequantizeLinear" for node in consumers)
    assert all(len(node.outputs[0].uses()) == 1 for node in model.graph if node.op_type == "DequantizeLinear")
    assert _counts(model)["DequantizeLinear"] == 6  # 3 activation + 3 weight DQs


def test_weights_become_int8_per_channel_and_float_copies_disappear():
    """Each weight is an int8 initializer with axis=1 scales; the float weight is removed."""
    _, model, _, _, _ = _quantize(mlp_with_attention_matmul(), preset=Preset.TRANSFORMER)
    for name in ("w1", "w2", "w3"):
        assert name not in model.graph.initializers
        quantized = model.graph.initializers[f"{name}_quantized"]
        assert quantized.const_value.numpy().dtype == np.int8
        dq = next(use.node for use in quantized.uses())
        assert dq.attributes.get_int("axis") == 1
        assert dq.inputs[1].const_value.numpy().shape == (quantized.const_value.numpy().shape[1],)
        assert "per-channel axis 1" in dq.metadata_props["qcompiler.quantizer"]


def test_quantized_mlp_stays_close_to_float():
    """W8A8 output of the MLP is within a few quantization steps of float (cosine > 0.999)."""
    reference, model, _, feeds, _ = _quantize(mlp_with_attention_matmul(), preset=Preset.TRANSFORMER)
    expected, got = run(reference, feeds[0])[0], run(model, feeds[0])[0]
    cosine = np.sum(expected * got) / np.linalg.norm(expected) / np.linalg.norm(got)
    assert cosine > 0.999
    assert np.abs(expected - got).max() < 0.05 * np.abs(expected).max()


def test_conv_gets_int32_bias_and_output_quantizer():
    """Conv: int32 bias with scale x_scale * w_scale, and Q/DQ on its output; Gemm: int32 bias only."""
    _, model, _, _, pass_result = _quantize(gemm_conv_model())
    conv = next(node for node in model.graph if node.op_type == "Conv")
    bias_dq = conv.inputs[2].producer()
    assert bias_dq.op_type == "DequantizeLinear" and bias_dq.inputs[0].const_value.numpy().dtype == np.int32
    weight_scales = conv.inputs[1].producer().inputs[1].const_value.numpy()
    input_scale = conv.inputs[0].producer().inputs[1].const_value.numpy()
    np.testing.assert_allclose(bias_dq.inputs[1].const_value.numpy(), input_scale * weight_scales, rtol=1e-6)
    assert [use.node.op_type for use in conv.outputs[0].uses()] == ["QuantizeLinear"]
    gemm = next(node for node in model.graph if node.op_type == "Gemm")
    assert gemm.inputs[2].producer().op_type == "DequantizeLinear"
    assert not any(use.node.op_type == "QuantizeLinear" for use in gemm.outputs[0].uses())


def test_cnn_quantized_numerics():
    """The Conv/Gemm model stays within 5 % relative error of float."""
    reference, model, _, feeds, _ = _quantize(gemm_conv_model())
    expected, got = run(reference, feeds[0])[0], run(model, feeds[0])[0]
    assert np.abs(expected - got).max() < 0.05 * np.abs(expected).max()


@pytest.mark.parametrize(
    "builder, preset, kernels",
    [
        (mlp_with_attention_matmul, Preset.TRANSFORMER, {"MatMulIntegerToFloat", "QLinearMatMul"}),
        (mlp_with_attention_matmul, Preset.DEFAULT, {"MatMulIntegerToFloat", "QLinearMatMul"}),
        (gemm_conv_model, Preset.DEFAULT, {"QGemm", "QLinearConv"}),
    ],
)
def test_every_unit_fuses_in_onnxruntime(builder, preset, kernels):
    """The emitted form is what ORT CPU fuses: every quantized node becomes an integer kernel."""
    _, model, plan, _, _ = _quantize(builder(), preset=preset)
    ort_backend.lower(model)
    ort_backend.check(model)
    report = count_fusion(model, [str(unit.node.name) for unit in plan.units])
    assert report.not_fused == {}
    assert len(report.fused) == len(plan.units)
    assert set(report.fused.values()) <= kernels


def test_symmetric_int8_activations_option():
    """int8 symmetric activations: zero point 0 and int8 zero-point initializers."""
    _, model, _, _, _ = _quantize(
        mlp_with_attention_matmul(), preset=Preset.TRANSFORMER, activations=ActivationOptions(symmetric=True)
    )
    # The pass was built with UINT8 in _quantize; symmetric uint8 puts the zero point at 128.
    q = next(node for node in model.graph if node.op_type == "QuantizeLinear")
    assert int(q.inputs[2].const_value.numpy()) == 128


def test_range_search_records_the_chosen_candidate():
    """RangeMethod.SEARCH picks one of the candidates per tensor and says which in the metadata."""
    from qcompiler.options import RangeMethod

    _, model, _, _, _ = _quantize(
        mlp_with_attention_matmul(),
        preset=Preset.TRANSFORMER,
        activations=ActivationOptions(range_method=RangeMethod.SEARCH),
    )
    descriptions = [
        node.metadata_props["qcompiler.quantizer"] for node in model.graph if node.op_type == "QuantizeLinear"
    ]
    assert len(descriptions) == 2
    assert all(
        any(f"range={name} " in text for name in ("minmax", "p99.99", "p99.9", "mse"))
        for text in descriptions
    )


def test_compile_accepts_a_generator_of_feeds():
    """A one-shot generator is read once into a list: every batch reaches calibration."""
    import qcompiler

    model = mlp_with_attention_matmul()
    feeds = random_feeds(model, batches=5)
    options = CompileOptions(preset=Preset.TRANSFORMER, count_fusion=False)
    result = qcompiler.compile(model, "ort-cpu", options, data=(feed for feed in feeds), progress=False)
    assert result.report.data["batches"] == 5
    assert result.report.nodes["quantized"] == 3
