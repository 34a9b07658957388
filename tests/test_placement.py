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
