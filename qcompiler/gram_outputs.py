"""Gram statistics computed by the calibration graph itself: XᵀX per block appended as outputs.

The runtime then returns [blocks, B, B] per batch (in bf16 on OpenVINO's fast path) instead of
the activations; `qcompiler.calibration` decides per request (`_gram_in_graph`) and reads the
products back through each request's `GramSlot`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, cast

import numpy as np
import onnx_ir as ir

from qcompiler.irutil import add_initializer
from qcompiler.precision import REDUCED_TYPES

if TYPE_CHECKING:
    from qcompiler.calibration import StatKey, StatRequest


@dataclasses.dataclass(frozen=True)
class GramSlot:
    """Where one Gram request's result lies in the calibration graph's outputs."""

    products: str
    """The output holding the [blocks, B, B] products of every in-graph Gram of block size B."""
    start: int
    stop: int
    """This request's blocks in it."""
    count: int
    """The position of its row count in the `GRAM_COUNTS` output."""


GRAM_COUNTS = "qcompile_gram_counts"
"""Output of the calibration graph holding the rows of each in-graph Gram's activation."""


def add_gram_outputs(model: ir.Model, requests: Mapping[StatKey, StatRequest]) -> dict[StatKey, GramSlot]:
    """Append XᵀX per block (and the row counts) as outputs computed in the graph.

    For X [..., C] in blocks of B: Reshape to [n, C / B, B], Transpose to [C / B, n, B], MatMul
    of its transpose and itself -> [C / B, B, B]; Shape of the [n, C] view for n. The products of
    one block size are concatenated into one output and the shapes into another: the runtime
    does the arithmetic (in bf16 on OpenVINO's fast path) and returns a few kilobytes per batch
    instead of the activations, in a few outputs instead of two per tensor (SmolLM2, 121 Grams:
    0.20 -> 0.16 s per 512-token window).
    """
    values = {str(value.name): value for value in model.graph.inputs}
    values.update({str(output.name): output for node in model.graph for output in node.outputs})
    graph = model.graph
    by_block: dict[int, list[tuple[StatKey, ir.Value, int]]] = {}
    shapes = []
    for index, (key, request) in enumerate(requests.items()):
        source = values[str(request.value.name)]
        if request.value.dtype in REDUCED_TYPES:  # XᵀX of an FP16 model's activations overflows in FP16
            source = _append(
                graph, f"qcompile_gram_{index}", "Cast", [source], "float32", to=ir.DataType.FLOAT
            )
        channels = cast(int, request.value.shape.dims[-1])  # type: ignore[union-attr]
        block = request.size or channels
        prefix = f"qcompile_gram_{index}"
        rows = _append(
            graph,
            prefix,
            "Reshape",
            [source, add_initializer(graph, f"{prefix}_rows_shape", np.array([-1, channels]))],
            "rows",
        )
        blocks = _append(
            graph,
            prefix,
            "Reshape",
            [
                rows,
                add_initializer(graph, f"{prefix}_blocks_shape", np.array([-1, channels // block, block])),
            ],
            "blocks",
        )
        # [C / B, n, B] and its last-two-axes transpose: OpenVINO folds the latter into the
        # MatMul (transpose_a); a [1, 2, 0] Transpose it copies instead (3.4x slower per Gram here)
        right = _append(graph, prefix, "Transpose", [blocks], "right", perm=[1, 0, 2])
        left = _append(graph, prefix, "Transpose", [right], "left", perm=[0, 2, 1])
        product = _append(graph, prefix, "MatMul", [left, right], "product")
        shapes.append(_append(graph, prefix, "Shape", [rows], "count"))
        by_block.setdefault(block, []).append((key, product, channels // block))
    if not shapes:
        return {}
    counts = _append(graph, "qcompile_gram", "Concat", shapes, "counts", axis=0)
    graph.outputs.append(counts)
    slots: dict[StatKey, GramSlot] = {}
    count_index = {key: 2 * position for position, key in enumerate(requests)}
    for block, members in by_block.items():
        products = _append(
            graph,
            f"qcompile_gram_b{block}",
            "Concat",
            [product for _, product, _ in members],
            "products",
            axis=0,
        )
        graph.outputs.append(products)
        start = 0
        for key, _, count in members:
            slots[key] = GramSlot(str(products.name), start, start + count, count_index[key])
            start += count
    return slots


def _append(
    graph: ir.Graph,
    prefix: str,
    op: str,
    inputs: list[ir.Value],
    name: str,
    **attributes: int | list[int] | ir.DataType,
) -> ir.Value:
    """Append one node named `prefix/name`; return its output, named `prefix_name`."""
    created = ir.node(op, inputs, attributes or None, name=f"{prefix}/{name}")
    created.outputs[0].name = f"{prefix}_{name}"
    graph.append(created)
    return created.outputs[0]
