"""Our packed-FP4 MatMul (onnxruntime-extensions op): packing against the numpy reference, the op
in onnxruntime against the reference, on both scale formats."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qcompiler.backends.onnxruntime.fp4_matmul import DOMAIN, OP_TYPE, dequantize, pack_fp4
from qcompiler.backends.onnxruntime.session import create_session, session_options
from qcompiler.options import WeightFormat
from qcompiler.weight_formats import quantize

CASES = [(WeightFormat.MXFP4, 32, 96), (WeightFormat.NVFP4, 16, 96), (WeightFormat.MXFP4, 32, 101)]
"""(format, block, K): K = 101 pads the last byte and the last block."""


def _weight(rows: int, columns: int = 24) -> np.ndarray:
    rng = np.random.default_rng(rows)
    weight = rng.standard_normal((rows, columns)).astype(np.float32)
    weight[::7] *= 20.0  # rows of outliers: blocks with very different scales
    return weight


@pytest.mark.parametrize(("fmt", "block", "rows"), CASES)
def test_packing_decodes_to_the_quantized_weight_exactly(fmt, block, rows):
    compressed = quantize(_weight(rows), fmt, block)
    packed = pack_fp4(compressed)
    assert packed.packed.shape == (24, (rows + 1) // 2) and packed.packed.dtype == np.uint8
    assert packed.scales.shape == (24, -(-rows // block)) and packed.scales.dtype == np.uint8
    assert packed.scale_type == (0 if fmt is WeightFormat.MXFP4 else 1)
    decoded = dequantize(packed.packed, packed.scales, packed.global_scale, rows, block, packed.scale_type)
    np.testing.assert_array_equal(decoded, compressed.dequantize().T)  # bit for bit


def test_packing_puts_the_first_element_in_the_low_nibble_and_e8m0_is_a_biased_exponent():
    weight = np.zeros((32, 1), np.float32)
    weight[0, 0], weight[1, 0] = 6.0, -0.5  # E2M1 codes 7 and 9 at scale 1
    packed = pack_fp4(quantize(weight, WeightFormat.MXFP4, 32))
    assert packed.packed[0, 0] == 0x97 and packed.scales[0, 0] == 127


def _op_model(packed, batch_shape: tuple[int, ...]) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([*batch_shape, packed.K]))
    constants = [
        ir.Value(name=name, const_value=ir.tensor(array, name=name))
        for name, array in (("b", packed.packed), ("scales", packed.scales), ("global", packed.global_scale))
    ]
    attributes = {
        "K": packed.K,
        "N": packed.N,
        "block_size": packed.block_size,
        "scale_type": packed.scale_type,
    }
    node = ir.node(OP_TYPE, [x, *constants], attributes, domain=DOMAIN, name="fp4")
    node.outputs[0].name = "y"
    graph = ir.Graph(
        [x], node.outputs, nodes=[node], initializers=constants, opset_imports={"": 21, DOMAIN: 1}
    )
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize(("fmt", "block", "rows"), CASES)
def test_the_op_in_onnxruntime_matches_the_numpy_reference(fmt, block, rows):
    compressed = quantize(_weight(rows), fmt, block)
    session = create_session(_op_model(pack_fp4(compressed), (2, 5)), session_options())
    x = np.random.default_rng(1).standard_normal((2, 5, rows)).astype(np.float32)
    expected = x @ compressed.dequantize()
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-4)
