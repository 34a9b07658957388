"""Fusing a KV-cache decoder's attention into GroupQueryAttention (onnxruntime backend).

The small decoder below is spelled as optimum's Llama export spells it: Q/K/V Reshape ->
Transpose, rotary x * cos + rotate_half(x) * sin, cache Concat (graph outputs), grouped-KV repeat
(Unsqueeze -> Expand -> Reshape), scaled scores, a causal/padding mask, Softmax, the export's
Where(IsNaN) guard, the value MatMul, Transpose -> Reshape. The real SmolLM2 KV export is checked
in benchmarks/decode_latency.py (it needs optimum in a separate environment).
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest

import qcompiler
from qcompiler.backends.onnxruntime.attention import fuse_group_query_attention
from qcompiler.backends.onnxruntime.session import create_session, session_options
from tests.graphs import add, const, model_of

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD = 50, 64, 4, 2, 16
LAYERS = 2


def _int_input(name: str, shape: list) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(shape))


def _cache_input(name: str) -> ir.Value:
    shape = ir.Shape(["batch", KV_HEADS, "past", HEAD])
    return ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=shape)


def kv_decoder() -> ir.Model:
    """Embedding -> LAYERS x (attention with a KV cache + residual) -> LM head."""
    rng = np.random.default_rng(0)
    ids, mask, positions = (
        _int_input("input_ids", ["batch", "seq"]),
        _int_input("attention_mask", ["batch", "total"]),
        _int_input("position_ids", ["batch", "seq"]),
    )
    caches = [_cache_input(f"past_key_values.{i}.{kind}") for i in range(LAYERS) for kind in ("key", "value")]
    graph = ir.Graph([ids, mask, positions, *caches], [], nodes=[], name="kv_decoder")

    def weight(name: str, rows: int, columns: int) -> ir.Value:
        return const(graph, name, (rng.standard_normal((rows, columns)) * 0.2).astype(np.float32))

    def ints(name: str, values: list[int]) -> ir.Value:
        return const(graph, name, np.array(values, np.int64))

    x = add(graph, "Gather", [weight("embed", VOCAB, HIDDEN), ids], "embed")
    inverse = (1.0 / 10000 ** (np.arange(0, HEAD, 2) / HEAD)).astype(np.float32)
    angle = add(
        graph,
        "Mul",
        [
            add(
                graph,
                "Unsqueeze",
                [add(graph, "Cast", [positions], "pos_f", to=1), ints("last", [-1])],
                "pos_u",
            ),
            const(graph, "inv_freq", inverse),
        ],
        "freqs",
    )
    emb = add(graph, "Concat", [angle, angle], "emb", axis=-1)
    cos, sin = add(graph, "Cos", [emb], "cos"), add(graph, "Sin", [emb], "sin")
    # causal and padding mask: key j visible to query i when j <= position_i and mask_j == 1
    total = add(graph, "Gather", [add(graph, "Shape", [mask], "mask_shape"), ints("one_index", [1])], "total")
    keys = add(
        graph,
        "Range",
        [
            const(graph, "zero", np.array(0, np.int64)),
            add(graph, "Squeeze", [total], "t"),
            const(graph, "step", np.array(1, np.int64)),
        ],
        "keys",
    )
    causal = add(
        graph, "LessOrEqual", [keys, add(graph, "Unsqueeze", [positions, ints("m1", [-1])], "rows")], "causal"
    )
    padding = add(graph, "Cast", [add(graph, "Unsqueeze", [mask, ints("a1", [1])], "mask_u")], "mask_b", to=9)
    visible = add(
        graph, "Unsqueeze", [add(graph, "And", [causal, padding], "visible3"), ints("a1b", [1])], "visible"
    )
    bias = add(
        graph,
        "Where",
        [visible, const(graph, "open", np.float32(0)), const(graph, "closed", np.float32(-1e9))],
        "bias",
    )

    def heads_first(value: ir.Value, heads: int, name: str) -> ir.Value:
        shaped = add(graph, "Reshape", [value, ints(f"{name}_shape", [0, 0, heads, HEAD])], f"{name}_reshape")
        return add(graph, "Transpose", [shaped], f"{name}_t", perm=[0, 2, 1, 3])

    def rotate(value: ir.Value, name: str) -> ir.Value:
        half = HEAD // 2
        first = add(
            graph,
            "Slice",
            [value, ints(f"{name}_s0", [0]), ints(f"{name}_e0", [half]), ints(f"{name}_ax0", [3])],
            f"{name}_x1",
        )
        second = add(
            graph,
            "Slice",
            [value, ints(f"{name}_s1", [half]), ints(f"{name}_e1", [HEAD]), ints(f"{name}_ax1", [3])],
            f"{name}_x2",
        )
        rotated = add(
            graph, "Concat", [add(graph, "Neg", [second], f"{name}_neg"), first], f"{name}_rot", axis=-1
        )
        cos_u = add(graph, "Unsqueeze", [cos, ints(f"{name}_c1", [1])], f"{name}_cos")
        sin_u = add(graph, "Unsqueeze", [sin, ints(f"{name}_s1u", [1])], f"{name}_sin")
        return add(
            graph,
            "Add",
            [
                add(graph, "Mul", [value, cos_u], f"{name}_mc"),
                add(graph, "Mul", [rotated, sin_u], f"{name}_ms"),
            ],
            f"{name}_rope",
        )

    def repeat(value: ir.Value, name: str) -> ir.Value:
        expanded = add(
            graph,
            "Expand",
            [
                add(graph, "Unsqueeze", [value, ints(f"{name}_u", [2])], f"{name}_unsq"),
                ints(f"{name}_rep", [1, 1, HEADS // KV_HEADS, 1, 1]),
            ],
            f"{name}_expand",
        )
        return add(
            graph, "Reshape", [expanded, ints(f"{name}_merge", [0, HEADS, -1, HEAD])], f"{name}_repeat"
        )

    def rms_norm(value: ir.Value, name: str) -> ir.Value:
        """The export's spelling: Pow -> ReduceMean -> Add eps -> Sqrt -> Div(1, .) -> Mul x -> Mul weight."""
        square = add(graph, "Pow", [value, const(graph, f"{name}_two", np.float32(2))], f"{name}_pow")
        mean = add(graph, "ReduceMean", [square, ints(f"{name}_axes", [-1])], f"{name}_mean", keepdims=1)
        shifted = add(graph, "Add", [mean, const(graph, f"{name}_eps", np.float32(1e-5))], f"{name}_add")
        inverse = add(
            graph,
            "Div",
            [const(graph, f"{name}_one", np.float32(1)), add(graph, "Sqrt", [shifted], f"{name}_sqrt")],
            f"{name}_div",
        )
        gain = const(graph, f"{name}_weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        return add(graph, "Mul", [gain, add(graph, "Mul", [value, inverse], f"{name}_mul")], f"{name}_scale")

    def projection(value: ir.Value, prefix: str, kind: str, heads: int) -> ir.Value:
        """value @ W -> [B, heads, S, HEAD] (the export's Reshape -> Transpose)."""
        matmul = add(
            graph,
            "MatMul",
            [value, weight(f"{prefix}_w{kind}", HIDDEN, heads * HEAD)],
            f"{prefix}_{kind}_proj",
        )
        return heads_first(matmul, heads, f"{prefix}_{kind}")

    scale = const(graph, "root_scale", np.float32(HEAD**-0.25))
    for layer in range(LAYERS):
        p = f"l{layer}"
        h = rms_norm(x, f"{p}_norm")

        q = rotate(projection(h, p, "q", HEADS), f"{p}_q")
        k = rotate(projection(h, p, "k", KV_HEADS), f"{p}_k")
        v = projection(h, p, "v", KV_HEADS)
        present = []
        for kind, new, past in (("key", k, caches[2 * layer]), ("value", v, caches[2 * layer + 1])):
            concat = add(graph, "Concat", [past, new], f"{p}_present_{kind}", axis=-2)
            concat.name = f"present.{layer}.{kind}"
            graph.outputs.append(concat)
            present.append(concat)
        keys_t = add(graph, "Transpose", [repeat(present[0], f"{p}_kr")], f"{p}_kt", perm=[0, 1, 3, 2])
        scores = add(
            graph,
            "MatMul",
            [add(graph, "Mul", [q, scale], f"{p}_qs"), add(graph, "Mul", [keys_t, scale], f"{p}_ks")],
            f"{p}_scores",
        )
        probs = add(
            graph, "Softmax", [add(graph, "Add", [scores, bias], f"{p}_masked")], f"{p}_softmax", axis=-1
        )
        guarded = add(
            graph,
            "Where",
            [add(graph, "IsNaN", [probs], f"{p}_nan"), const(graph, f"{p}_zero", np.float32(0)), probs],
            f"{p}_guard",
        )
        context = add(graph, "MatMul", [guarded, repeat(present[1], f"{p}_vr")], f"{p}_context")
        merged = add(
            graph,
            "Reshape",
            [
                add(graph, "Transpose", [context], f"{p}_ct", perm=[0, 2, 1, 3]),
                ints(f"{p}_cm", [0, 0, HEADS * HEAD]),
            ],
            f"{p}_merged",
        )
        x = add(
            graph,
            "Add",
            [x, add(graph, "MatMul", [merged, weight(f"{p}_wo", HEADS * HEAD, HIDDEN)], f"{p}_o_proj")],
            f"{p}_residual",
        )
    logits = add(graph, "MatMul", [rms_norm(x, "final_norm"), weight("lm_head", HIDDEN, VOCAB)], "lm_head")
    logits.name = "logits"
    graph.outputs.insert(0, logits)
    return model_of(graph, 18)


def _feed(past: int, new: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(past + new)
    feed = {
        "input_ids": rng.integers(0, VOCAB, (1, new)),
        "attention_mask": np.ones((1, past + new), np.int64),
        "position_ids": np.arange(past, past + new)[None, :],
    }
    for layer in range(LAYERS):
        for kind in ("key", "value"):
            feed[f"past_key_values.{layer}.{kind}"] = rng.standard_normal((1, KV_HEADS, past, HEAD)).astype(
                np.float32
            )
    return feed


def test_the_pass_fuses_every_layer_and_computes_the_same():
    """Each layer -> one GroupQueryAttention; logits and caches equal the unfused graph's (prefill,
    decode after a cache, chunked prefill)."""
    model = kv_decoder()
    reference = create_session(model, session_options())
    fused = model.clone()
    assert fuse_group_query_attention(fused) == LAYERS
    kinds = collections.Counter(node.op_type for node in fused.graph)
    assert kinds["GroupQueryAttention"] == LAYERS and kinds["Softmax"] == 0 and kinds["Sin"] == 0
    gqa = next(node for node in fused.graph if node.op_type == "GroupQueryAttention")
    assert gqa.attributes.get_int("num_heads") == HEADS and gqa.attributes.get_int("kv_num_heads") == KV_HEADS
    assert gqa.attributes.get_float("scale") == pytest.approx(HEAD**-0.5)
    session = create_session(fused, session_options())
    for past, new in ((0, 6), (9, 1), (5, 3)):
        feed = _feed(past, new)
        for expected, actual in zip(reference.run(None, feed), session.run(None, feed), strict=True):
            np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def test_compile_fuses_attention_unless_asked_not_to():
    """ort-cpu weight compression fuses attention by default (reported), Q/K/V MatMulNBits packed into
    one; --unfused-attention keeps its nodes (RMSNorms are fused either way: the rewrite is exact)."""
    options = qcompiler.CompressionOptions(format=qcompiler.WeightFormat.INT8, group_size=0)
    fused = qcompiler.compile(
        kv_decoder(), "ort-cpu", qcompiler.CompileOptions(compression=options), progress=False
    )
    assert fused.report.compression["fused"] == {
        "GroupQueryAttention": LAYERS,
        "SimplifiedLayerNormalization": LAYERS + 1,
    }
    kept = qcompiler.CompressionOptions(
        format=qcompiler.WeightFormat.INT8, group_size=0, fuse_attention=False
    )
    unfused = qcompiler.compile(
        kv_decoder(), "ort-cpu", qcompiler.CompileOptions(compression=kept), progress=False
    )
    assert unfused.report.compression["fused"] == {"SimplifiedLayerNormalization": LAYERS + 1}  # exact
    packed = [node for node in fused.model.graph if str(node.name).endswith("_QKV")]
    assert len(packed) == LAYERS and packed[0].attributes.get_int("N") == (HEADS + 2 * KV_HEADS) * HEAD
    assert all(
        node.inputs[1] is None and node.inputs[2] is None
        for node in fused.model.graph
        if node.op_type == "GroupQueryAttention"
    )
    assert sum(node.op_type == "Softmax" for node in unfused.model.graph) == LAYERS
    feed = _feed(4, 1)
    a = create_session(fused.model, session_options()).run(None, feed)
    b = create_session(unfused.model, session_options()).run(None, feed)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)


def test_rms_norms_become_simplified_layer_normalization_and_compute_the_same():
    from qcompiler.backends.onnxruntime.norms import fuse_rms_norms

    model = kv_decoder()
    reference = create_session(model, session_options())
    fused = model.clone()
    assert fuse_rms_norms(fused) == LAYERS + 1
    kinds = collections.Counter(node.op_type for node in fused.graph)
    assert kinds["SimplifiedLayerNormalization"] == LAYERS + 1 and kinds["Pow"] == kinds["Sqrt"] == 0
    norm = next(node for node in fused.graph if node.op_type == "SimplifiedLayerNormalization")
    assert norm.attributes.get_float("epsilon") == pytest.approx(1e-5)
    feed = _feed(3, 2)
    session = create_session(fused, session_options())
    for expected, actual in zip(reference.run(None, feed), session.run(None, feed), strict=True):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_a_graph_without_the_pattern_is_left_alone():
    from qcompiler.backends.onnxruntime.norms import fuse_rms_norms
    from tests.test_compression import tiny_decoder

    model = tiny_decoder()
    before = [node.op_type for node in model.graph]
    assert fuse_group_query_attention(model) == 0
    assert fuse_rms_norms(model) == 0  # LayerNormalization, not an RMSNorm
    assert [node.op_type for node in model.graph] == before


def test_an_fp16_decoder_fuses_with_fp16_rotary_caches():
    """The FP16 model onnxruntime's converter makes: GroupQueryAttention gets its cos / sin caches in
    FP16 (it refuses FP32 ones beside FP16 queries) and computes what the unfused FP16 graph does."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = ir.from_proto(convert_float_to_float16(ir.to_proto(kv_decoder()), keep_io_types=False))
    reference = create_session(model, session_options())
    fused = model.clone()
    assert fuse_group_query_attention(fused) == LAYERS
    caches = [fused.graph.initializers[name] for name in ("gqa_cos_cache", "gqa_sin_cache")]
    assert all(cache.dtype == ir.DataType.FLOAT16 for cache in caches)
    onnx.checker.check_model(ir.to_proto(fused))
    session = create_session(fused, session_options())
    for past, new in ((0, 6), (9, 1)):
        feed = {
            name: value.astype(np.float16) if value.dtype == np.float32 else value
            for name, value in _feed(past, new).items()
        }
        for expected, actual in zip(reference.run(None, feed), session.run(None, feed), strict=True):
            np.testing.assert_allclose(
                actual.astype(np.float32), expected.astype(np.float32), rtol=2e-2, atol=2e-2
            )
