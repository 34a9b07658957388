"""RMSNorm spelled out by an exporter -> onnxruntime's ``SimplifiedLayerNormalization``.

Llama-style exports write each RMSNorm as ~10 nodes: [Cast] -> Pow(x, 2) -> ReduceMean(last axis)
-> Add(eps) -> Sqrt -> Div(1, .) -> Mul(x, .) -> [Cast] -> Mul(weight). A decoder has two per
layer plus the final one (61 in SmolLM2); at decode time each node costs more than its arithmetic.
onnxruntime's contrib op computes the same in one kernel: x / sqrt(mean(x²) + eps) * weight.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _scalar(value: ir.Value | None) -> float | None:
    if value is None or value.const_value is None or value.const_value.size != 1:
        return None
    return float(value.const_value.numpy().reshape(()))


def _skip_cast(value: ir.Value | None) -> ir.Value | None:
    """Through a float -> float Cast the exporter keeps for mixed precision."""
    cast = _producer(value, "Cast")
    if cast is not None and cast.attributes.get_int("to", 0) == ir.DataType.FLOAT and value is not None:
        return (
            cast.inputs[0]
            if cast.inputs[0] is not None and cast.inputs[0].dtype == ir.DataType.FLOAT
            else value
        )
    return value


def _match(scale_mul: ir.Node) -> tuple[ir.Value, ir.Value, float] | None:
    """(x, weight, epsilon) if `scale_mul` is the final Mul(weight) of an RMSNorm."""
    for index in (0, 1):
        weight, normed = scale_mul.inputs[index], scale_mul.inputs[1 - index]
        if weight is None or weight.const_value is None or len(weight.const_value.shape) != 1:
            continue
        product = _producer(_skip_cast(normed), "Mul")
        if product is None:
            continue
        for side in (0, 1):
            x, inverse = product.inputs[side], product.inputs[1 - side]
            divide = _producer(inverse, "Div")
            if divide is None or _scalar(divide.inputs[0]) != 1.0:
                continue
            root = _producer(divide.inputs[1], "Sqrt")
            add = _producer(root.inputs[0] if root is not None else None, "Add")
            if add is None:
                continue
            epsilon = next((e for v in add.inputs if (e := _scalar(v)) is not None), None)
            mean = next((n for v in add.inputs if (n := _producer(v, "ReduceMean")) is not None), None)
            square = _producer(mean.inputs[0] if mean is not None else None, "Pow")
            if epsilon is None or mean is None or square is None or _scalar(square.inputs[1]) != 2.0:
                continue
            axes = mean.inputs[1] if len(mean.inputs) > 1 else None
            last_axis = (
                axes is not None
                and axes.const_value is not None
                and axes.const_value.numpy().tolist() == [-1]
            )
            if last_axis and mean.attributes.get_int("keepdims", 1) == 1 and square.inputs[0] is x:
                return _skip_cast(x), weight, epsilon  # type: ignore[return-value]
    return None


def fuse_rms_norms(model: ir.Model) -> int:
    """Replace every matched RMSNorm with SimplifiedLayerNormalization in place; returns how many."""
    graph = model.graph
    fused = 0
    for node in list(graph):
        if node.op_type != "Mul" or node.domain not in ("", "ai.onnx"):
            continue
        match = _match(node)
        if match is None:
            continue
        x, weight, epsilon = match
        norm = ir.node(
            "SimplifiedLayerNormalization",
            [x, weight],
            {"axis": -1, "epsilon": epsilon, "stash_type": 1},
            name=f"{node.name}/SimplifiedLayerNormalization",
        )
        output = node.outputs[0]
        norm.outputs[0].type, norm.outputs[0].shape = output.type, output.shape
        graph.insert_before(node, norm)
        name = str(output.name)
        output.replace_all_uses_with(norm.outputs[0], replace_graph_outputs=True)
        output.name, norm.outputs[0].name = f"{name}_unfused", name
        fused += 1
    if fused:
        onnx_ir.passes.common.RemoveUnusedNodesPass()(model)
    return fused
