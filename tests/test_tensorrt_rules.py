"""TensorRT's parser rules (`backends/tensorrt/legality.py`): one offending graph per rule, its message asserted."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

from qcompiler.backends.tensorrt import legality
from qcompiler.errors import LegalityError
from tests.graphs import add, const, model_of

FP16 = ir.DataType.FLOAT16
INT8_ZERO = np.int8(0)


def _qdq_matmul(
    *,
    dtype: ir.DataType = FP16,
    zero: np.ndarray | np.generic | None = INT8_ZERO,
    scale: np.ndarray | None = None,
    weight_codes: np.ndarray | None = None,
    weight_scale: np.ndarray | None = None,
    weight_axis: int | None = 1,
    block_size: int = 0,
    opset: int = 21,
) -> ir.Model:
    """x -> Q -> DQ -> MatMul(DQ(int8 weight)): TensorRT's W8A8 pattern, each part replaceable."""
    float_type = np.float16 if dtype == FP16 else np.float32
    x = ir.Value(name="x", type=ir.TensorType(dtype), shape=ir.Shape([2, 8]))
    graph = ir.Graph([x], [], nodes=[], name="qdq")
    scale = np.asarray(0.05, float_type) if scale is None else scale
    q_inputs = [x, const(graph, "x_scale", scale)] + (
        [const(graph, "x_zero", zero)] if zero is not None else []
    )
    q = add(graph, "QuantizeLinear", q_inputs, "q")
    dq = add(graph, "DequantizeLinear", [q, *q_inputs[1:]], "dq")
    codes = np.ones((8, 4), np.int8) if weight_codes is None else weight_codes
    w_scale = np.full(4, 0.01, float_type) if weight_scale is None else weight_scale
    attributes: dict[str, int] = {} if weight_axis is None else {"axis": weight_axis}
    if block_size:
        attributes["block_size"] = block_size
    w_dq = add(
        graph,
        "DequantizeLinear",
        [const(graph, "w_codes", codes), const(graph, "w_scale", w_scale)],
        "w_dq",
        **attributes,
    )
    y = add(graph, "MatMul", [dq, w_dq], "matmul")
    y.shape = ir.Shape([2, 4])
    graph.outputs.append(y)
    for node in graph:
        for output in node.outputs:
            if output.dtype is None and node.op_type != "QuantizeLinear":
                output.type = ir.TensorType(dtype)
    model = model_of(graph, opset)
    model.ir_version = 10
    return model


def _problems(model: ir.Model, rule: str) -> list[str]:
    return [
        problem
        for problem in legality.problems_of(model, strongly_typed=True)
        if problem.startswith(f"[{rule}]")
    ]


def test_the_emitted_pattern_passes_every_rule():
    assert legality.problems_of(_qdq_matmul(), strongly_typed=True) == []


def test_unsigned_zero_point_is_refused():
    problems = _problems(_qdq_matmul(zero=np.uint8(128)), "quantize-types")
    assert len(problems) == 2  # the quantizer and its dequantizer
    assert all("TensorRT only allows FP8, INT8, INT4, and FP4 quantization" in p for p in problems)


def test_quantizer_without_zero_point_is_read_as_int8():
    (problem,) = _problems(_qdq_matmul(zero=None), "quantize-types")
    assert "TensorRT imports it as INT8" in problem


def test_nonzero_zero_point_is_refused():
    problems = _problems(_qdq_matmul(zero=np.int8(3)), "zero-points")
    assert problems and all("Non-zero zero point is not supported" in p for p in problems)


def test_zero_scale_is_refused():
    problems = _problems(_qdq_matmul(weight_scale=np.array([0.01, 0.0, 0.01, 0.01], np.float16)), "scales")
    assert problems == ["[scales] w_dq: Scale coefficients must all be positive (and finite)"]


def test_scale_type_must_match_a_strongly_typed_input():
    problems = _problems(_qdq_matmul(scale=np.asarray(0.05, np.float32)), "scales")
    assert any("must match the input data type" in p for p in problems)


def test_per_channel_activation_scale_is_refused():
    problems = _problems(
        _qdq_matmul(scale=np.full(8, 0.05, np.float16), zero=np.zeros(8, np.int8)), "granularity"
    )
    assert any("Activations cannot be quantized per-channel" in p for p in problems)


def test_per_channel_weight_scale_count_must_match_its_axis():
    problems = _problems(_qdq_matmul(weight_scale=np.full(8, 0.01, np.float16)), "granularity")
    assert any("The number of scales is not equal to the number of output channels" in p for p in problems)


def test_block_scale_with_two_blocked_axes_is_refused():
    model = _qdq_matmul(weight_scale=np.full((2, 2), 0.01, np.float16), weight_axis=0, block_size=4)
    problems = _problems(model, "granularity")
    assert any("Only a single blocking dimension is allowed" in p for p in problems)


def test_blocked_int4_weight_needs_an_even_element_count():
    codes = np.ones((5, 3), ml_dtypes.int4)  # 15 codes: one byte holds half a pair
    model = _qdq_matmul(
        weight_codes=codes, weight_scale=np.full((1, 3), 0.01, np.float16), weight_axis=0, block_size=5
    )
    problems = _problems(model, "granularity")
    assert any("4-bit quantization requires an even number of elements" in p for p in problems)


def test_fp8_needs_opset_19():
    model = _qdq_matmul(
        dtype=ir.DataType.FLOAT,
        scale=np.asarray(0.05, np.float32),
        zero=np.asarray(0, ml_dtypes.float8_e4m3fn),
        weight_scale=np.full(4, 0.01, np.float32),
        opset=17,
    )
    problems = _problems(model, "opset")
    assert any("FLOAT8E4M3FN Q/DQ (or block_size) needs opset 19" in p for p in problems)


def test_ir_version_must_allow_the_opsets():
    model = _qdq_matmul()
    model.ir_version = 8
    assert _problems(model, "ir-version") == [
        "[ir-version] model: IR version 8 is below 10, the first one that allows its opsets"
    ]


def test_cast_between_dq_and_gemm_is_refused():
    model = _qdq_matmul()
    graph = model.graph
    matmul = next(node for node in graph if node.op_type == "MatMul")
    cast = ir.node("Cast", [matmul.inputs[1]], {"to": FP16}, name="cast")
    cast.outputs[0].type = ir.TensorType(FP16)
    graph.insert_before(matmul, cast)
    matmul.replace_input_with(1, cast.outputs[0])
    assert _problems(model, "cast-before-gemm") == [
        "[cast-before-gemm] cast: a Cast between w_dq and matmul (breaks Q/DQ fusion)"
    ]


def test_contrib_and_undeclared_trt_ops_are_refused():
    model = _qdq_matmul()
    graph = model.graph
    y = graph.outputs[0]
    graph.append(ir.node("MatMulNBits", [y], domain="com.microsoft", name="nbits"))
    graph.append(ir.node("TRT_FP4DynamicQuantize", [y], domain="trt", name="fp4"))
    problems = _problems(model, "domains")
    assert "[domains] nbits: com.microsoft.MatMulNBits has no TensorRT importer" in problems
    assert "[domains] fp4: domain 'trt' is not declared in opset_import" in problems


def test_fp32_gemm_in_a_strongly_typed_artifact_is_refused():
    model = _qdq_matmul(
        dtype=ir.DataType.FLOAT, scale=np.asarray(0.05, np.float32), weight_scale=np.full(4, 0.01, np.float32)
    )
    assert _problems(model, "float16-remainder") == [
        "[float16-remainder] matmul: MatMul computes in FP32 (a strongly typed network runs it in FP32)"
    ]
    assert legality.problems_of(model) == []  # the structural rules alone accept it (the canonical form)


def test_int32_bias_dequantizer_is_refused():
    model = _qdq_matmul()
    graph = model.graph
    graph.append(
        ir.node(
            "DequantizeLinear",
            [
                const(graph, "bias", np.zeros(4, np.int32)),
                const(graph, "b_scale", np.full(4, 0.1, np.float16)),
            ],
            {"axis": 0},
            name="bias_dq",
        )
    )
    assert (
        "[quantize-types] bias_dq: an int32 bias DequantizeLinear (TensorRT keeps biases float)"
        in _problems(model, "quantize-types")
    )


def test_onnx_full_check_runs_on_the_artifact():
    model = _qdq_matmul()
    next(node for node in model.graph if node.op_type == "MatMul").outputs[0].type = ir.TensorType(
        ir.DataType.INT8
    )
    (problem,) = _problems(model, "onnx-checker")
    assert problem.startswith("[onnx-checker] model: onnx.checker:")


def test_check_raises_one_error_naming_rule_and_node():
    with pytest.raises(LegalityError, match=r"TensorRT's rules: \[zero-points\] q: Non-zero zero point"):
        legality.check(_qdq_matmul(zero=np.int8(3)))
