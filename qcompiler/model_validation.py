"""The input model validated before any work: each problem one error naming the file and the node or tensor.

A malformed model used to fail deep inside a pass (``Graph contains a cycle``, a shape inference
on a null type), or worse, to compile: a NaN weight quantized to garbage codes with numpy's
"invalid value encountered in cast" as the only sign. The checks here run first, cheapest first:

0. every inline constant's bytes fit its element type and shape (`malformed_tensors`);
1. every node input and graph output is defined: a graph input, an initializer, or the output of
   a node in scope (`undefined_inputs`);
2. the graph is acyclic (`find_cycle`) and its types and shapes fit every op's schema (`inference_error`);
3. every op is one the target's runtime has (the backend's `unknown_ops`, read by the driver);
4. weights are finite (`nonfinite_weights`): NaN in any float constant, and ±Inf in a constant a
   weighted op reads (MatMul, Gemm, Conv, Gather). Infinities elsewhere are legitimate: exporters
   fill attention masks with -inf.

External data (present, inside the model's folder, as long as its offsets say) is checked when
the file is read (`qcompiler.io.load`).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from qcompiler.errors import InvalidModelError

WEIGHT_READERS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", "MatMulInteger"})
"""Ops whose constant inputs are weights: an infinity there is never meaningful."""

CHUNK_BYTES = 64 * 2**20
"""External tensors are scanned this many bytes at a time (read, not memory-mapped: the check
must not leave a 4 GB model's pages resident)."""


def undefined_inputs(model: ir.Model) -> list[tuple[ir.Node | None, ir.Value]]:
    """(reader, value) for each value read but never defined; reader None for a graph output.

    onnx_ir's loader creates a placeholder value for a name no scope defines (with a warning),
    so the loaded model is well-formed in memory and wrong in meaning: this finds them.
    """
    found: list[tuple[ir.Node | None, ir.Value]] = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        found.extend((node, value) for value in node.inputs if value is not None and not _defined(value))
    for graph in model.graphs():
        found.extend((None, value) for value in graph.outputs if not _defined(value))
    return found


def _defined(value: ir.Value) -> bool:
    return value.producer() is not None or value.is_graph_input() or value.is_initializer()


def inference_error(model: ir.Model) -> str | None:
    """Onnx's strict type and shape inference over every node (its first line), or None.

    Declared graph output shapes are left out: exporters declare some that contradict their
    producers, which normalization repairs (`RepairOutputShapesPass`). Weights are left out of
    the proto onnx reads too (onnx_ir's `call_onnx_api`), so this costs no copy of them.
    """
    import onnx
    from onnx_ir.passes.common import _c_api_utils

    def check(proto: onnx.ModelProto) -> None:
        for output in proto.graph.output:
            output.type.tensor_type.ClearField("shape")
        del proto.graph.value_info[:]
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=False)

    try:
        _c_api_utils.call_onnx_api(check, model)
    except Exception as exc:  # onnx raises InferenceError, ValidationError or RuntimeError
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return lines[0] if lines else type(exc).__name__
    return None


def find_cycle(graph: ir.Graph) -> list[ir.Node]:
    """Nodes of one cycle in `graph` (empty when it is acyclic), in the order they feed each other.

    Kahn's algorithm removes every node whose inputs are all ready; what remains lies on or after
    a cycle. Walking producers backwards from a remaining node must revisit a node: that loop is
    the cycle named in the error.
    """
    nodes = list(graph)
    producers = {id(node): _producers(node, graph) for node in nodes}
    waiting = {id(node): len(producers[id(node)]) for node in nodes}
    readers: dict[int, list[ir.Node]] = collections.defaultdict(list)
    for node in nodes:
        for producer in producers[id(node)]:
            readers[id(producer)].append(node)
    ready = [node for node in nodes if waiting[id(node)] == 0]
    while ready:
        node = ready.pop()
        for reader in readers[id(node)]:
            waiting[id(reader)] -= 1
            if waiting[id(reader)] == 0:
                ready.append(reader)
    remaining = {id(node): node for node in nodes if waiting[id(node)] > 0}
    if not remaining:
        return []
    walk: list[ir.Node] = []
    node = next(iter(remaining.values()))
    while node not in walk:
        walk.append(node)
        node = next(p for p in producers[id(node)] if id(p) in remaining)
    return list(reversed(walk[walk.index(node) :]))


def _producers(node: ir.Node, graph: ir.Graph) -> set[ir.Node]:
    """The nodes of `graph` that `node` reads from (its subgraphs' outer-scope reads included)."""
    found = set()
    values = list(node.inputs)
    for attribute in node.attributes.values():
        for subgraph in _subgraphs(attribute):
            values.extend(v for n in ir.traversal.RecursiveGraphIterator(subgraph) for v in n.inputs)
    for value in values:
        producer = value.producer() if value is not None else None
        if producer is not None and producer.graph is graph and producer is not node:
            found.add(producer)
    return found


def _subgraphs(attribute: ir.Attr) -> list[ir.Graph]:
    if attribute.type == ir.AttributeType.GRAPH:
        return [attribute.as_graph()]
    if attribute.type == ir.AttributeType.GRAPHS:
        return list(attribute.as_graphs())
    return []


@dataclasses.dataclass(frozen=True)
class NonFinite:
    """A float constant holding NaN or ±Inf where it may not."""

    name: str
    reader: str
    nans: int
    infinities: int
    size: int


def nonfinite_weights(model: ir.Model) -> list[NonFinite]:
    """Float constants (initializers and Constant nodes) with NaN, or ±Inf where a weighted op reads them."""
    found = []
    for name, tensor, readers in _float_constants(model):
        nans, infinities = count_nonfinite(tensor)
        weighted = any(reader.op_type in WEIGHT_READERS for reader in readers)
        if nans or (infinities and weighted):
            reader = readers[0] if readers else None
            label = f"{reader.op_type} {reader.name!r}" if reader is not None else "no node"
            found.append(NonFinite(name, label, nans, infinities if weighted else 0, tensor.size))
    return found


def _float_constants(model: ir.Model) -> Iterator[tuple[str, ir.TensorProtocol, list[ir.Node]]]:
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is not None and tensor.dtype.is_floating_point():
                yield str(value.name), tensor, [use.node for use in value.uses()]
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        attribute = node.attributes.get("value") if node.op_type == "Constant" else None
        if attribute is not None and attribute.type == ir.AttributeType.TENSOR:
            tensor = attribute.as_tensor()
            if tensor.dtype.is_floating_point():
                yield node.name or str(node.outputs[0].name), tensor, [u.node for u in node.outputs[0].uses()]


def count_nonfinite(tensor: ir.TensorProtocol) -> tuple[int, int]:
    """(NaN count, ±Inf count) of a float tensor; an external one is read in chunks, not mapped."""
    nans = infinities = 0
    for chunk in _float_chunks(tensor):
        finite = np.isfinite(chunk)
        if finite.all():
            continue
        nan = int(np.count_nonzero(np.isnan(chunk)))
        nans += nan
        infinities += int(chunk.size - np.count_nonzero(finite)) - nan
    return nans, infinities


def _float_chunks(tensor: ir.TensorProtocol) -> Iterator[np.ndarray]:
    """The tensor's values as float arrays numpy tests (bfloat16 / float8 widened per chunk)."""
    dtype = tensor.dtype.numpy()
    if isinstance(tensor, ir.ExternalTensor):
        count = tensor.size
        step = max(1, CHUNK_BYTES // dtype.itemsize)
        with open(tensor.path, "rb") as file:
            for start in range(0, count, step):
                file.seek((tensor.offset or 0) + start * dtype.itemsize)
                yield _widened(np.fromfile(file, dtype=dtype, count=min(step, count - start)))
        return
    yield _widened(np.asarray(tensor.numpy()).reshape(-1))


def _widened(array: np.ndarray) -> np.ndarray:
    return array if array.dtype in (np.float16, np.float32, np.float64) else array.astype(np.float32)


def malformed_tensors(model: ir.Model) -> list[tuple[str, str]]:
    """(initializer, what is wrong) for inline constants whose bytes do not match their type and shape.

    External tensors are checked against their file when the model is read (`io.load`).
    """
    found = []
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or isinstance(tensor, ir.ExternalTensor):
                continue
            try:
                if tensor.dtype == ir.DataType.UNDEFINED:
                    raise ValueError("its element type is UNDEFINED")
                array = tensor.numpy()
                if array.size != tensor.size:
                    raise ValueError(
                        f"it holds {array.size} values, its shape {list(tensor.shape)} needs {tensor.size}"
                    )
            except Exception as exc:  # onnx_ir raises ValueError / TypeError for inconsistent protos
                found.append((str(value.name), str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
    return found


def validate(model: ir.Model, source: str) -> None:
    """Raise `InvalidModelError` for the first structural or numeric problem of `model` (read from `source`)."""
    malformed = malformed_tensors(model)
    if malformed:
        name, problem = malformed[0]
        more = f" (+{len(malformed) - 1} more)" if len(malformed) > 1 else ""
        raise InvalidModelError(f"{source}: initializer {name!r} is malformed: {problem}{more}")
    undefined = undefined_inputs(model)
    if undefined:
        reader, value = undefined[0]
        where = f"node {reader.name!r} ({reader.op_type}) reads" if reader else "graph output"
        more = f" (+{len(undefined) - 1} more)" if len(undefined) > 1 else ""
        raise InvalidModelError(
            f"{source}: {where} {value.name!r}, which no graph input, initializer or node defines{more}"
        )
    for graph in model.graphs():
        cycle = find_cycle(graph)
        if cycle:
            loop = " -> ".join(repr(node.name) for node in (*cycle, cycle[0]))
            raise InvalidModelError(f"{source}: the graph has a cycle: {loop}")
    inconsistent = inference_error(model)
    if inconsistent:
        raise InvalidModelError(
            f"{source}: its types or shapes are inconsistent (onnx's inference: {inconsistent})"
        )
    bad = nonfinite_weights(model)
    if bad:
        first = bad[0]
        counts = ", ".join(
            f"{count} {what}" for count, what in ((first.nans, "NaN"), (first.infinities, "Inf")) if count
        )
        more = f" (+{len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise InvalidModelError(
            f"{source}: weight {first.name!r} (read by {first.reader}) holds {counts} of {first.size} "
            f"values{more}; quantizing it would give garbage codes: repair or re-export the model"
        )
