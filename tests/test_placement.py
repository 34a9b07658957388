from qcompiler.options import CompileOptions, IgnoredScope, Preset, WeightOptions
from qcompiler.rewrites.normalize import NormalizePass
from qcompiler.rewrites.placement import plan_quantizers
from qcompiler.targets import ORT_CPU
from tests.graphs import gemm_conv_model, mlp_with_attention_matmul


def _plan(model, **options):
    NormalizePass()(model)
    return plan_quantizers(model, ORT_CPU, CompileOptions(**options))


def _names(plan):
    return [str(unit.node.name) for unit in plan.units]


def test_transformer_preset_quantizes_only_weighted_matmuls():
    """Attention-score MatMul (two activations) stays float with a reason; weighted ones are units."""
    plan = _plan(mlp_with_attention_matmul(), preset=Preset.TRANSFORMER)
    assert _names(plan) == ["fc1", "fc2", "fc3"]
    assert "no constant weight" in plan.skipped["scores"]


def test_default_preset_quantizes_activation_matmul_on_both_inputs():
    """Without the preset the scores MatMul gets two activation quantizers and no weight."""
    plan = _plan(mlp_with_attention_matmul())
    scores = next(unit for unit in plan.units if unit.node.name == "scores")
    assert scores.activation_inputs == (0, 1) and scores.weight_input is None


def test_shared_activation_is_one_quantizer():
    """fc2 and fc3 read the same Relu output: the plan lists that tensor once."""
    plan = _plan(mlp_with_attention_matmul(), preset=Preset.TRANSFORMER)
    names = [str(value.name) for value in plan.activation_values()]
    assert names == ["x", "relu_out"]


def test_weight_axes_per_op():
    """MatMul [K, N] -> axis 1; Gemm transB [N, K] -> axis 0; Conv [M, C, kh, kw] -> axis 0."""
    mlp = _plan(mlp_with_attention_matmul(), preset=Preset.TRANSFORMER)
    assert {unit.weight_axis for unit in mlp.units} == {1}
    cnn = _plan(gemm_conv_model())
    axes = {str(unit.node.name): unit.weight_axis for unit in cnn.units}
    assert axes == {"conv": 0, "gemm": 0}
    per_tensor = _plan(gemm_conv_model(), weights=WeightOptions(per_channel=False))
    assert {unit.weight_axis for unit in per_tensor.units} == {None}


def test_bias_and_output_quantization_follow_the_target():
    """ORT CPU: int32 bias for Conv and Gemm; only Conv needs an output quantizer (QLinearConv)."""
    plan = _plan(gemm_conv_model())
    units = {str(unit.node.name): unit for unit in plan.units}
    assert units["conv"].bias_input == 2 and units["gemm"].bias_input == 2
    assert units["conv"].quantize_output and not units["gemm"].quantize_output


def test_ignored_scope_by_name_regex_and_op_type():
    """Each kind of ignored scope removes the node and records why."""
    by_name = _plan(
        mlp_with_attention_matmul(), preset=Preset.TRANSFORMER, ignored=IgnoredScope(names=("fc2",))
    )
    assert _names(by_name) == ["fc1", "fc3"] and by_name.skipped["fc2"] == "in the ignored scope"
    by_regex = _plan(
        mlp_with_attention_matmul(), preset=Preset.TRANSFORMER, ignored=IgnoredScope(patterns=(r"fc[23]",))
    )
    assert _names(by_regex) == ["fc1"]
    by_type = _plan(gemm_conv_model(), ignored=IgnoredScope(op_types=("Conv",)))
    assert _names(by_type) == ["gemm"]


def test_op_types_option_restricts_placement():
    """--op-types Gemm leaves Conv alone (not even listed as skipped)."""
    plan = _plan(gemm_conv_model(), op_types=("Gemm",))
    assert _names(plan) == ["gemm"] and "conv" not in plan.skipped


def _attention_block():
    """q, k, v projections -> Reshape/Transpose -> Q Kᵀ -> Softmax -> x V: a BERT self-attention."""
    import numpy as np
    import onnx_ir as ir

    from tests.graphs import add, const, float_input, model_of

    rng = np.random.default_rng(3)
    x = float_input("x", [2, 8, 16])
    graph = ir.Graph([x], [], nodes=[], name="attention")
    heads = const(graph, "heads", np.array([2, 8, 2, 8]))
    projected = {}
    for name in ("q", "k", "v"):
        weight = const(graph, f"w_{name}", rng.standard_normal((16, 16)).astype(np.float32))
        bias = const(graph, f"b_{name}", rng.standard_normal(16).astype(np.float32))
        out = add(graph, "Add", [add(graph, "MatMul", [x, weight], f"{name}_proj"), bias], f"{name}_bias")
        perm = [0, 2, 3, 1] if name == "k" else [0, 2, 1, 3]
        projected[name] = add(
            graph, "Transpose", [add(graph, "Reshape", [out, heads], f"{name}_heads")], f"{name}_t", perm=perm
        )
    scores = add(graph, "MatMul", [projected["q"], projected["k"]], "scores")
    probs = add(graph, "Softmax", [scores], "softmax", axis=-1)
    graph.outputs.append(add(graph, "MatMul", [probs, projected["v"]], "context"))
    model = model_of(graph)
    NormalizePass()(model)
    return model


def test_openvino_quantizes_query_and_key_before_their_reshape_symmetrically():
    """NNCF's form, which OpenVINO runs as an int8 attention kernel: Q and K quantized symmetric on
    the bias Add output (before Reshape / Transpose); probabilities x V left float; not on onnxruntime."""
    from qcompiler.targets import OPENVINO_CPU

    model = _attention_block()
    options = CompileOptions(preset=Preset.TRANSFORMER).resolved()
    plan = plan_quantizers(model, OPENVINO_CPU, options)
    hoisted = {str(unit.node.name): unit for unit in plan.units if unit.symmetric}
    assert sorted(hoisted) == ["k_heads", "q_heads"]
    assert (
        {str(u.node.inputs[0].name) for u in hoisted.values()}
        == plan.symmetric_values()
        == {"q_bias_out", "k_bias_out"}
    )
    assert "probabilities x V stay float" in plan.skipped["context"]
    assert "scores" not in plan.skipped
    ort_plan = plan_quantizers(model, ORT_CPU, options)
    assert not any(unit.symmetric for unit in ort_plan.units) and "scores" in ort_plan.skipped
