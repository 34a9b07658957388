"""Building an `openvino.Model` back from an onnx_ir graph in the OpenVINO dialect.

The dialect (OpenVINO ops in the ``org.openvinotoolkit`` domain, read by the core frontend
`qcompiler.frontends.openvino_ir`) may be mixed with the ONNX ops the passes insert:
`to_openvino_model` builds OpenVINO ops by `NodeFactory` and ONNX ops by `standard_ops.BUILDERS`,
so a model read and rebuilt computes exactly what it did.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common

from qcompiler.errors import UnsupportedModelError
from qcompiler.frontends.openvino_ir import (
    DOMAIN,
    ELEMENT_TYPES,
    VERSION_KEY,
    attributes_of,
)


def to_openvino_model(model: ir.Model):  # ir.Model -> openvino.Model
    """Rebuild the `openvino.Model` of a dialect graph made by `from_openvino` (lifted or not).

    The graph's nodes are sorted topologically in place (nothing else changes).
    """
    import openvino as ov
    import openvino.opset13 as ops
    from openvino.utils.node_factory import NodeFactory

    factories: dict[str, NodeFactory] = {}
    built: dict[int, object] = {}  # id(ir.Value) -> openvino.Output
    parameters = []
    for value in model.graph.inputs:
        element = next(key for key, dtype in ELEMENT_TYPES.items() if dtype == value.dtype)
        dims = (
            [dim if isinstance(dim, int) else -1 for dim in value.shape] if value.shape is not None else None
        )
        shape = ov.PartialShape(dims) if dims is not None else ov.PartialShape.dynamic()
        parameter = ops.parameter(shape, getattr(ov.Type, element), name=str(value.name))
        parameter.output(0).get_tensor().set_names({str(value.name)})
        parameters.append(parameter)
        built[id(value)] = parameter.output(0)
    for value in model.graph.initializers.values():
        assert value.const_value is not None
        constant = ops.constant(value.const_value.numpy())
        constant.set_friendly_name(str(value.name).removesuffix(":0"))
        built[id(value)] = constant.output(0)
    ir.passes.common.TopologicalSortPass()(model)  # the passes append what they insert
    quantizers: dict[int, tuple[ir.Node, list]] = {}  # id(Q output) -> (Q, its OpenVINO inputs)
    for node in model.graph:
        # a QuantizeLinear's output is not built: its DequantizeLinear becomes the FakeQuantize
        arguments = [built.get(id(value)) if value is not None else None for value in node.inputs]
        if node.domain != DOMAIN:
            created = _standard(node, arguments, quantizers)
            if created is not None:
                created.set_friendly_name(str(node.name))
                for index, output in enumerate(node.outputs):
                    created.output(index).get_tensor().add_names({str(output.name)})
                    built[id(output)] = created.output(index)
            continue
        version = node.metadata_props.get(VERSION_KEY, f"opset{node.version or 1}")
        factory = factories.setdefault(version, NodeFactory(version))
        created = factory.create(node.op_type, arguments, attributes_of(node))
        created.set_friendly_name(str(node.name))
        for index, output in enumerate(node.outputs):
            created.output(index).get_tensor().set_names({str(output.name)})
            built[id(output)] = created.output(index)
    results = [ops.result(built[id(value)]) for value in model.graph.outputs]
    return ov.Model(results, parameters, model.graph.name or "model")


def _standard(node: ir.Node, arguments: list, quantizers: dict[int, tuple[ir.Node, list]]):
    """The OpenVINO node of an ONNX node in a lifted graph (None for a QuantizeLinear: its DQ builds it)."""
    from qcompiler.backends.openvino.standard_ops import BUILDERS, fake_quantize

    where = f"node {node.name!r}: {node.domain or 'ai.onnx'}::{node.op_type}"
    if node.domain not in ("", "ai.onnx"):
        raise UnsupportedModelError(f"{where} is not an OpenVINO op")
    if node.op_type == "QuantizeLinear":
        quantizers[id(node.outputs[0])] = (node, arguments)
        return None
    if node.op_type == "DequantizeLinear":
        source = node.inputs[0]
        if source is None or id(source) not in quantizers:
            raise UnsupportedModelError(f"{where}: only Q -> DQ pairs and canonical weights are lowered")
        quantize, quantize_arguments = quantizers[id(source)]
        if id(quantize) not in quantizers:  # one FakeQuantize per Q, however many DQs read it
            quantizers[id(quantize)] = (quantize, [fake_quantize(quantize, quantize_arguments)])
        return quantizers[id(quantize)][1][0]
    if node.op_type not in BUILDERS:
        raise UnsupportedModelError(f"{where} has no OpenVINO lowering in a graph read from OpenVINO IR")
    return BUILDERS[node.op_type](node, arguments)
