"""Decoder attention with a KV cache -> onnxruntime's fused ``GroupQueryAttention``.

An exported Llama-style decoder (optimum's ``text-generation-with-past``) spells each layer's
attention in ~150 small nodes: Q/K/V reshapes and transposes, rotary embedding (x * cos +
rotate_half(x) * sin), the cache Concat, the grouped-KV repeat (Unsqueeze -> Expand -> Reshape),
scaled scores, the causal/padding mask, Softmax, the value MatMul and the transposes back. At
decode time (one token) those nodes cost more than the layer's INT4 MatMuls. This pass finds the
pattern structurally, starting from each Softmax and walking to the graph's ``past_*`` inputs and
``present_*`` outputs, and replaces it with one ``com.microsoft.GroupQueryAttention`` per layer
(rotary inside, ``do_rotary=1``). Its cos/sin caches are computed by running the model's own
rotary subgraph for every position, so the fused op uses the exact values the export did.

What the fused op assumes, and the export does not check: the attention mask has no padding
inside the sequence (batch 1 generation, or right-padded batches) and positions are 0..total-1,
which is what ``position_ids`` holds in generation. A layer that does not match is left alone.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from qcompiler.irutil import add_initializer
from qcompiler.precision import as_type, float_type_of, numpy_type

MS_DOMAIN = "com.microsoft"
MAX_POSITIONS = 8192
"""Rows of the cos/sin caches (SmolLM2's max_position_embeddings)."""


@dataclasses.dataclass
class _Layer:
    """The tensors one attention layer reads and writes, found by `_match`."""

    query: ir.Value
    key: ir.Value
    value: ir.Value
    past_key: ir.Value
    past_value: ir.Value
    present_key: ir.Value
    present_value: ir.Value
    output: ir.Value
    cos: ir.Value
    sin: ir.Value
    scale: float


def _producer(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type in op_types and node.domain in ("", "ai.onnx") else None


def _scalar(value: ir.Value | None) -> float | None:
    if value is None or value.const_value is None or value.const_value.size != 1:
        return None
    return float(value.const_value.numpy().reshape(()))


def _scaled(value: ir.Value | None) -> tuple[ir.Value | None, float]:
    """`value` = x * c with a scalar constant c -> (x, c); else (value, 1)."""
    mul = _producer(value, "Mul")
    if mul is not None:
        for index in (0, 1):
            factor = _scalar(mul.inputs[1 - index])
            if factor is not None:
                return mul.inputs[index], factor
    return value, 1.0


def _heads_first(value: ir.Value | None) -> ir.Value | None:
    """X [B, S, H*D] from Transpose(perm 0,2,1,3)(Reshape(x)) -> [B, H, S, D]; else None."""
    transpose = _producer(value, "Transpose")
    if transpose is None or list(transpose.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return None
    reshape = _producer(transpose.inputs[0], "Reshape")
    return reshape.inputs[0] if reshape is not None else None


def _unrotate(value: ir.Value | None) -> tuple[ir.Value, ir.Value, ir.Value] | None:
    """x_rot = x * Unsqueeze(cos) + rotate_half(x) * Unsqueeze(sin) -> (x [B, S, H*D], cos, sin)."""
    add = _producer(value, "Add")
    if add is None:
        return None
    found: dict[str, ir.Value] = {}
    for operand in add.inputs:
        mul = _producer(operand, "Mul")
        if mul is None:
            return None
        for index in (0, 1):
            table = _producer(mul.inputs[1 - index], "Unsqueeze")
            other = mul.inputs[index]
            if table is None or other is None:
                continue
            if _producer(other, "Concat") is not None:
                found["sin"] = table.inputs[0]  # type: ignore[assignment]
            elif _heads_first(other) is not None:
                found["cos"] = table.inputs[0]  # type: ignore[assignment]
                found["x"] = _heads_first(other)  # type: ignore[assignment]
    if set(found) != {"x", "cos", "sin"}:
        return None
    return found["x"], found["cos"], found["sin"]


def _cache_concat(value: ir.Value | None) -> ir.Node | None:
    """Walk a grouped-KV repeat (Reshape / Expand / Unsqueeze) up to the cache Concat (a graph output)."""
    for _ in range(4):
        node = value.producer() if value is not None else None
        if node is None:
            return None
        if node.op_type == "Concat" and node.outputs[0].is_graph_output() and len(node.inputs) == 2:
            past = node.inputs[0]
            return node if past is not None and past.is_graph_input() else None
        if node.op_type not in ("Reshape", "Expand", "Unsqueeze"):
            return None
        value = node.inputs[0]
    return None


def _match(softmax: ir.Node) -> _Layer | None:
    """The layer around `softmax`, or None when any piece is not where the pattern puts it."""
    scores = softmax.inputs[0]
    add = _producer(scores, "Add")
    if add is not None:
        scores = next((v for v in add.inputs if _producer(v, "MatMul") is not None), None)
    product = _producer(scores, "MatMul")
    if product is None:
        return None
    query_rotated, query_scale = _scaled(product.inputs[0])
    keys, key_scale = _scaled(product.inputs[1])
    transpose = _producer(keys, "Transpose")
    if transpose is None or list(transpose.attributes.get_ints("perm", [])) != [0, 1, 3, 2]:
        return None
    key_cache = _cache_concat(transpose.inputs[0])
    probabilities = softmax.outputs[0]
    for use in list(probabilities.uses()):  # Where(IsNaN(p), 0, p): a no-op guard the export adds
        if use.node.op_type == "Where" and use.idx == 2:
            probabilities = use.node.outputs[0]
    weighted = next((u.node for u in probabilities.uses() if u.node.op_type == "MatMul" and u.idx == 0), None)
    if key_cache is None or weighted is None:
        return None
    value_cache = _cache_concat(weighted.inputs[1])
    back = [u.node for u in weighted.outputs[0].uses()]
    if value_cache is None or len(back) != 1 or back[0].op_type != "Transpose":
        return None
    merge = [u.node for u in back[0].outputs[0].uses()]
    if len(merge) != 1 or merge[0].op_type != "Reshape":
        return None
    query = _unrotate(query_rotated)
    key = _unrotate(key_cache.inputs[1])
    value = _heads_first(value_cache.inputs[1])
    if query is None or key is None or value is None or (query[1], query[2]) != (key[1], key[2]):
        return None
    return _Layer(
        query=query[0],
        key=key[0],
        value=value,
        past_key=key_cache.inputs[0],  # type: ignore[arg-type]
        past_value=value_cache.inputs[0],  # type: ignore[arg-type]
        present_key=key_cache.outputs[0],
        present_value=value_cache.outputs[0],
        output=merge[0].outputs[0],
        cos=query[1],
        sin=query[2],
        scale=query_scale * key_scale,
    )


def _rotary_caches(model: ir.Model, cos: ir.Value, sin: ir.Value) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [MAX_POSITIONS, D / 2] from the model's own rotary subgraph (positions 0..max-1)."""
    from qcompiler.backends.onnxruntime.session import create_session, session_options

    probe = model.clone()
    names = {id(value): str(value.name) for value in (cos, sin)}
    values = {str(o.name): o for node in probe.graph for o in node.outputs}
    probe.graph.outputs.clear()
    probe.graph.outputs.extend(values[names[id(value)]] for value in (cos, sin))
    ir.passes.common.RemoveUnusedNodesPass()(probe)
    feed = {}
    for value in probe.graph.inputs:
        dims = [dim if isinstance(dim, int) else 1 for dim in value.shape.dims] if value.shape else [1]
        name = str(value.name)
        if name == "position_ids":
            feed[name] = np.arange(MAX_POSITIONS, dtype=np.int64)[None, :]
        elif name in ("input_ids", "attention_mask"):
            feed[name] = np.ones((1, MAX_POSITIONS), value.dtype.numpy())  # type: ignore[union-attr]
        else:  # an empty cache
            feed[name] = np.zeros(
                [0 if index == 2 else dim for index, dim in enumerate(dims)], numpy_type(float_type_of(value))
            )
    session = create_session(probe, session_options(level="disable"))
    cos_table, sin_table = session.run(None, feed)
    half = cos_table.shape[-1] // 2
    cos_table, sin_table = cos_table.reshape(MAX_POSITIONS, -1), sin_table.reshape(MAX_POSITIONS, -1)
    if not (
        np.array_equal(cos_table[:, :half], cos_table[:, half:])
        and np.array_equal(sin_table[:, :half], sin_table[:, half:])
    ):
        raise ValueError("rotary tables are not rotate_half style (cos = cat(f, f))")
    return np.ascontiguousarray(cos_table[:, :half]), np.ascontiguousarray(sin_table[:, :half])


def fuse_group_query_attention(model: ir.Model) -> int:
    """Replace every matched attention layer with GroupQueryAttention in place; returns how many."""
    graph = model.graph
    mask = next((value for value in graph.inputs if value.name == "attention_mask"), None)
    layers = [
        layer for node in list(graph) if node.op_type == "Softmax" and (layer := _match(node)) is not None
    ]
    if layers:  # one rotary table for all (the model's single rotary embedding)
        layers = [layer for layer in layers if (layer.cos, layer.sin) == (layers[0].cos, layers[0].sin)]
    if mask is None or not layers:
        return 0
    cos_cache, sin_cache = _rotary_caches(model, layers[0].cos, layers[0].sin)
    if (2 * cos_cache.shape[1]) % 16:  # onnxruntime's CPU kernel needs head sizes in multiples of 16
        return 0
    # GroupQueryAttention reads its caches in the query's type (FP16 for an FP16 model)
    computed = float_type_of(layers[0].query)
    cos_value = add_initializer(graph, "gqa_cos_cache", as_type(cos_cache, computed))
    sin_value = add_initializer(graph, "gqa_sin_cache", as_type(sin_cache, computed))
    seqlens, total = _sequence_lengths(graph, mask)
    for index, layer in enumerate(layers):
        head_size = 2 * cos_cache.shape[1]
        heads, kv_heads = _width(layer.query) // head_size, _width(layer.key) // head_size
        packed = _packed_projection(graph, [layer.query, layer.key, layer.value])
        projections = [packed, None, None] if packed is not None else [layer.query, layer.key, layer.value]
        node = ir.node(
            "GroupQueryAttention",
            [
                *projections,
                layer.past_key,
                layer.past_value,
                seqlens,
                total,
                cos_value,
                sin_value,
            ],
            {
                "num_heads": heads,
                "kv_num_heads": kv_heads,
                "do_rotary": 1,
                "rotary_interleaved": 0,
                "scale": float(layer.scale) if layer.scale != 1.0 else 1.0 / float(np.sqrt(head_size)),
            },
            domain=MS_DOMAIN,
            num_outputs=3,
            name=f"GroupQueryAttention_{index}",
        )
        graph.append(node)
        for old, new in zip(
            (layer.output, layer.present_key, layer.present_value), node.outputs, strict=True
        ):
            name = str(old.name)
            new.type, new.shape = old.type, old.shape
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            old.name, new.name = f"{name}_unfused", name
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    ir.passes.common.TopologicalSortPass()(model)
    return len(layers)


def _packed_projection(graph: ir.Graph, outputs: list[ir.Value]) -> ir.Value | None:
    """One MatMulNBits computing Q, K and V side by side (GroupQueryAttention's packed QKV input).

    Only when the three are MatMulNBits of the same input with the same K, bits, block size and
    accuracy level, without bias or g_idx: their packed rows, scales and zero points are laid out
    per output channel, so they stack along N. Three kernels per layer become one.
    """
    nodes = [value.producer() for value in outputs]
    if any(node is None or node.op_type != "MatMulNBits" or node.domain != MS_DOMAIN for node in nodes):
        return None
    first = nodes[0]
    assert first is not None
    same = ("K", "bits", "block_size", "accuracy_level")
    arity = {len(node.inputs) for node in nodes}  # type: ignore[union-attr]
    if (
        len({id(node.inputs[0]) for node in nodes}) != 1  # type: ignore[union-attr]
        or any(len({node.attributes.get_int(name, -1) for node in nodes}) != 1 for name in same)  # type: ignore[union-attr]
        or len(arity) != 1
        or max(arity) > 4
        or any(v is None or v.const_value is None for node in nodes for v in node.inputs[1:])  # type: ignore[union-attr]
    ):
        return None
    stacked = [
        np.concatenate([node.inputs[index].const_value.numpy() for node in nodes], axis=0)  # type: ignore[union-attr]
        for index in range(1, len(first.inputs))
    ]
    base = str(first.name).removesuffix("_NBits")
    kinds = ("packed", "scales", "zero_points")[: len(stacked)]
    constants = [
        add_initializer(graph, f"{base}_qkv_{kind}", array)
        for kind, array in zip(kinds, stacked, strict=True)
    ]
    attributes = {name: first.attributes.get_int(name) for name in same}
    attributes["N"] = sum(node.attributes.get_int("N") for node in nodes)  # type: ignore[union-attr, misc]
    packed = ir.node(
        "MatMulNBits", [first.inputs[0], *constants], attributes, domain=MS_DOMAIN, name=f"{base}_QKV"
    )
    packed.metadata_props.update(first.metadata_props)
    packed.outputs[0].name = f"{base}_qkv_output"
    packed.outputs[0].type = outputs[0].type
    graph.insert_before(first, packed)
    return packed.outputs[0]


def _width(value: ir.Value) -> int:
    """The last dimension of a projection's output: its shape, else its MatMul weight's columns."""
    if value.shape is not None and isinstance(value.shape.dims[-1], int):
        return int(value.shape.dims[-1])
    producer = value.producer()
    assert producer is not None
    if (
        producer.op_type == "MatMul"
        and producer.inputs[1] is not None
        and producer.inputs[1].const_value is not None
    ):
        return int(producer.inputs[1].const_value.numpy().shape[-1])
    return producer.attributes.get_int("N")  # MatMulNBits / MatMulBnb4 / MatMulFP4


def _sequence_lengths(graph: ir.Graph, mask: ir.Value) -> tuple[ir.Value, ir.Value]:
    """GroupQueryAttention's seqlens_k (tokens per row - 1, int32 [B]) and total length (int32 scalar)."""
    nodes = [
        ir.node(
            "ReduceSum",
            [mask, add_initializer(graph, "gqa_axis_1", np.array([1], np.int64))],
            {"keepdims": 0},
            name="gqa/tokens",
        ),
    ]
    nodes.append(
        ir.node(
            "Sub",
            [nodes[-1].outputs[0], add_initializer(graph, "gqa_one", np.array(1, np.int64))],
            name="gqa/last",
        )
    )
    nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], {"to": ir.DataType.INT32}, name="gqa/seqlens_k"))
    seqlens = nodes[-1].outputs[0]
    nodes.append(ir.node("Shape", [mask], {"start": 1, "end": 2}, name="gqa/total_shape"))
    nodes.append(ir.node("Squeeze", [nodes[-1].outputs[0]], name="gqa/total_scalar"))
    nodes.append(
        ir.node("Cast", [nodes[-1].outputs[0]], {"to": ir.DataType.INT32}, name="gqa/total_sequence_length")
    )
    total = nodes[-1].outputs[0]
    for node in nodes:
        node.outputs[0].name = str(node.name).replace("/", "_")
    graph.extend(nodes)
    return seqlens, total
