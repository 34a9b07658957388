"""Splitting a model into consecutive pieces, so a runtime holds one piece's weights at a time.

Calibrating an LLM in one session costs the runtime's copy of every weight on top of ours
(SmolLM2-135M in OpenVINO bf16 at 512 tokens: 1.44 GB for a 542 MB model). Run piece by piece,
the runtime holds one piece's weights, and what flows between pieces is the handful of tensors
live across the cut (a decoder's hidden state, mask and rotary tables), kept per batch.

Cuts fall where the fewest values are live, so on a transformer they land between blocks. A
piece is an `ir.Model` whose inputs are the values it reads from earlier pieces (or the model's
inputs) and whose outputs are the values later pieces read plus those asked for, all under their
original names. Weights are shared with the source model, not copied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import onnx_ir as ir


@dataclasses.dataclass
class Piece:
    """One consecutive run of nodes as a model of its own."""

    model: ir.Model
    inputs: list[str]
    """Names it reads: model inputs or outputs of earlier pieces."""
    carried: list[str]
    """Names of its outputs that later pieces read."""


def _has_subgraphs(model: ir.Model) -> bool:
    return any(
        attribute.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for node in model.graph
        for attribute in node.attributes.values()
    )


def _cuts(nodes: list[ir.Node], max_bytes: int, together: Collection[Collection[str]] = ()) -> list[int]:
    """Start index of each piece after the first.

    Walks the nodes accumulating the bytes of the initializers they first read; when the next
    node would take a piece over `max_bytes`, the piece is cut at the position with the fewest
    live values among those where it held at least half of that (the latest such position).
    No cut falls inside a set of `together` (node names): such a piece grows past `max_bytes`.
    """
    position = {id(node): index for index, node in enumerate(nodes)}
    blocked = _blocked_cuts(nodes, together)
    last_use: dict[int, int] = {}
    born: dict[int, int] = {}
    for index, node in enumerate(nodes):
        for value in node.inputs:
            if value is not None and not value.is_initializer():
                last_use[id(value)] = index
                producer = value.producer()
                born.setdefault(id(value), position.get(id(producer), -1) if producer else -1)
    # live[p]: values produced at or before p and read after p (a cut between p and p + 1)
    delta = [0] * (len(nodes) + 1)
    for key, last in last_use.items():
        if born[key] < last:  # live after each index in [born, last)
            delta[max(born[key], 0)] += 1
            delta[last] -= 1
    live, running = [], 0
    for index in range(len(nodes)):
        running += delta[index]
        live.append(running)
    cuts: list[int] = []
    seen: set[int] = set()
    held = 0
    candidates: list[tuple[int, int]] = []  # (live count, cut position) once half full
    first_read = []
    for node in nodes:
        fresh = 0
        for value in node.inputs:
            if value is not None and value.is_initializer() and id(value) not in seen:
                seen.add(id(value))
                fresh += value.const_value.nbytes if value.const_value is not None else 0
        first_read.append(fresh)
    for index, fresh in enumerate(first_read):
        if held + fresh > max_bytes and candidates:  # this node would overfill the piece: cut before it
            fewest = min(count for count, _ in candidates)
            cut = max(where for count, where in candidates if count == fewest)
            cuts.append(cut)
            held = sum(first_read[cut:index])
            candidates = [(count, where) for count, where in candidates if where > cut]
        held += fresh
        if held >= max_bytes // 2 and index + 1 < len(nodes) and (index + 1) not in blocked:
            candidates.append((live[index], index + 1))
    return cuts


def _blocked_cuts(nodes: list[ir.Node], together: Collection[Collection[str]]) -> set[int]:
    """Cut positions (a cut at p starts a piece at node p) that would split a set of `together`."""
    index_of = {str(node.name): index for index, node in enumerate(nodes)}
    blocked: set[int] = set()
    for names in together:
        found = [index_of[name] for name in names if name in index_of]
        if len(found) > 1:
            blocked.update(range(min(found) + 1, max(found) + 1))
    return blocked


def split(
    model: ir.Model, max_bytes: int, keep: Collection[str] = (), together: Collection[Collection[str]] = ()
) -> list[Piece]:
    """Consume `model` (a private clone) into pieces of about `max_bytes` of weights each.

    `keep` names values to output from the piece that computes them (the model's own outputs are
    dropped unless named). `together`: sets of node names no cut may separate (an AWQ group's
    producer and consumers: scaled only when one piece holds them all).
    A model with nested graphs (If, Loop), or one that fits, comes back as a single piece.
    """
    nodes = list(model.graph)
    graph_inputs = [str(value.name) for value in model.graph.inputs]
    cuts = [] if _has_subgraphs(model) else _cuts(nodes, max_bytes, together)
    if not cuts:
        return [Piece(model, graph_inputs, [])]
    ranges = list(zip([0, *cuts], [*cuts, len(nodes)], strict=True))
    piece_of = {id(node): number for number, (start, stop) in enumerate(ranges) for node in nodes[start:stop]}
    wanted = set(keep)
    pieces = []
    for number, (start, stop) in enumerate(ranges):
        members = nodes[start:stop]
        inputs: dict[int, ir.Value] = {}
        initializers: dict[int, ir.Value] = {}
        for node in members:
            for index, value in enumerate(node.inputs):
                if value is None:
                    continue
                if value.is_initializer():
                    stand_in = initializers.setdefault(
                        id(value),
                        ir.Value(
                            name=value.name, type=value.type, shape=value.shape, const_value=value.const_value
                        ),
                    )
                else:
                    producer = value.producer()
                    if producer is not None and piece_of.get(id(producer)) == number:
                        continue
                    stand_in = inputs.setdefault(
                        id(value), ir.Value(name=value.name, type=value.type, shape=value.shape)
                    )
                node.replace_input_with(index, stand_in)
        outputs, carried = [], []
        for node in members:
            for output in node.outputs:
                later = any(piece_of.get(id(use.node), number) > number for use in output.uses())
                if later:
                    carried.append(str(output.name))
                if later or str(output.name) in wanted:
                    outputs.append(output)
        pieces.append((members, list(inputs.values()), list(initializers.values()), outputs, carried))
    model.graph.outputs.clear()
    model.graph.inputs.clear()
    result = []
    for members, stand_ins, constants, outputs, carried in pieces:
        for node in reversed(members):
            model.graph.remove(node)
        graph = ir.Graph(
            stand_ins,
            outputs,
            nodes=members,
            initializers=constants,
            opset_imports=dict(model.opset_imports),
            name=model.graph.name,
        )
        piece = ir.Model(graph, ir_version=model.ir_version, producer_name="qcompiler.pieces")
        result.append(Piece(piece, [str(value.name) for value in stand_ins], carried))
    return result
