"""The rules an OpenVINO artifact must satisfy for its device, checked before it is saved.

Structural rules read the `openvino.Model`: every low-bit constant is a well-formed decompression
subgraph feeding a MatMul / Gather; a quantized op has all its inputs quantized (activations under
FakeQuantize, the weight under FakeQuantize or an integer decompression subgraph, which is what
``save_model`` makes of a weight FakeQuantize); NPU weights are symmetric, in the group sizes the
device runs, and the two quantized inputs of an eltwise share one scale. The runtime rule compiles
the model on CPU (GPU and NPU artifacts too: they must at least load) and, for the CPU target,
asks the compiled model whether each compressed weight is still compressed at run time.

`check` raises one `LegalityError` listing every violation as ``node: what is wrong`` and returns
warnings (facts of the runtime that are not the artifact's fault).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qcompiler.errors import LegalityError
from qcompiler.targets import Target

LOW_BIT_TYPES = frozenset({"u8", "i8", "u4", "i4", "nf4", "f4e2m1", "f8e4m3"})
INTEGER_TYPES = frozenset({"u8", "i8", "u4", "i4"})
CPU_RUNTIME_COMPRESSED = frozenset({"u8", "i8", "u4", "i4", "nf4", "f4e2m1"})
"""Weight types OpenVINO 2026.4's CPU plugin keeps compressed at run time; f8e4m3 weights are
decompressed to f32 when the model is compiled (measured: tests/test_openvino.py)."""
CPU_EXPANDED_COMPUTE_TYPES = frozenset({"bf16"})
"""Compute types whose graphs OpenVINO 2026.4.1's CPU plugin (f32 hint, no AMX / avx512_bf16) runs
with every compressed weight expanded at compile time, whatever the scales' type (an f16 graph
keeps them compressed)."""
QUANTIZED_OP_TYPES = frozenset({"MatMul", "Convolution"})
ELTWISE_TYPES = frozenset({"Add", "Multiply"})
PASS_THROUGH = frozenset({"Reshape", "Slice", "Convert", "Transpose"})
WEIGHT_READERS = frozenset({"MatMul", "Gather", "Convolution", "GroupConvolution", "ConvolutionBackpropData"})
"""Ops that read a decompressed weight: compressed MatMul / Gather tables, and W8A8 Conv weights
(the i8 constant of a Q/DQ'd Conv weight, which OpenVINO's low-precision transformations run int8)."""


@dataclasses.dataclass(frozen=True)
class Decompression:
    """A low-bit weight constant and where its decompressed values go.

    Attributes:
        constant: the friendly name of the Constant.
        element_type: its OpenVINO element type name (u4, nf4, ...).
        zero_point: whether a Subtract of a zero point follows the Convert.
        group_size: rows per scale (0 = per channel).
        reader: the node that reads the float values (a MatMul or Gather when well-formed).
        reader_type: its type name.
        problem: why the subgraph is malformed, or "".
    """

    constant: str
    element_type: str
    zero_point: bool
    group_size: int
    reader: str
    reader_type: str
    problem: str = ""


def _type_name(output) -> str:  # openvino.Output -> element type name
    return output.get_element_type().get_type_name()


def _only_reader(output):  # -> openvino.Node | None
    readers = list(output.get_target_inputs())
    return readers[0].get_node() if len(readers) == 1 else None


def decompressions(model) -> list[Decompression]:
    """Every low-bit weight constant of `model` (zero-point constants aside) and its subgraph."""
    found = []
    for node in model.get_ordered_ops():
        if node.get_type_name() != "Constant" or _type_name(node.output(0)) not in LOW_BIT_TYPES:
            continue
        convert = _only_reader(node.output(0))
        if convert is not None and convert.get_type_name() == "Convert":
            after = _only_reader(convert.output(0))
            if (
                after is not None
                and after.get_type_name() == "Subtract"
                and after.input_value(1).get_node() == convert
            ):
                continue  # a zero point: reported with its weight
        found.append(_trace(node))
    return found


def _trace(constant) -> Decompression:
    """Follow Convert -> [Subtract] -> Multiply -> [Reshape / Slice / Convert] from a constant."""
    name, element = constant.get_friendly_name(), _type_name(constant.output(0))
    shape = list(constant.output(0).get_shape())
    group = int(shape[2]) if len(shape) == 3 else 0

    def result(node, problem: str = "", zero_point: bool = False) -> Decompression:
        reader = node.get_friendly_name() if node is not None else "(several readers)"
        kind = node.get_type_name() if node is not None else ""
        return Decompression(name, element, zero_point, group, reader, kind, problem)

    node = _only_reader(constant.output(0))
    if node is None or node.get_type_name() != "Convert":
        return result(node, "the low-bit constant is not read by one Convert")
    node = _only_reader(node.output(0))
    zero_point = node is not None and node.get_type_name() == "Subtract"
    if zero_point:
        node = _only_reader(node.output(0))
    if node is None or node.get_type_name() != "Multiply":
        return result(node, "no Multiply by a scale after the Convert", zero_point)
    node = _only_reader(node.output(0))
    while node is not None and node.get_type_name() in PASS_THROUGH:
        node = _only_reader(node.output(0))
    if node is None or node.get_type_name() not in WEIGHT_READERS:
        return result(node, "the decompressed weight feeds no MatMul, Gather or Convolution", zero_point)
    return result(node, zero_point=zero_point)


def _decompression_rules(found: list[Decompression], target: Target) -> list[str]:
    problems = [f"{item.constant}: {item.problem} (reader: {item.reader})" for item in found if item.problem]
    if target.symmetric_weights:
        problems += [
            f"{item.constant}: {item.element_type} weight of {item.reader} has a zero point; {target.name} runs symmetric INT4 only"
            for item in found
            if item.element_type in ("u4", "i4") and (item.zero_point or item.element_type == "u4")
        ]
    if target.weight_group_sizes is not None:
        problems += [
            f"{item.constant}: group size {item.group_size} of {item.reader} is not one {target.name} runs "
            f"({', '.join(str(size) if size else 'per-channel' for size in target.weight_group_sizes)})"
            for item in found
            if item.element_type in ("u4", "i4", "nf4") and item.group_size not in target.weight_group_sizes
        ]
    return problems


def _is_integer_weight(output) -> bool:
    """A weight input computed from an integer constant by Convert -> [Subtract] -> Multiply."""
    node = output.get_node()
    while node.get_type_name() in ("Reshape", "Transpose", "Convert") and node.get_input_size():
        if node.get_type_name() == "Convert" and node.input_value(0).get_node().get_type_name() == "Constant":
            break
        node = node.input_value(0).get_node()
    if node.get_type_name() == "Multiply":
        node = node.input_value(0).get_node()
    if node.get_type_name() == "Subtract":
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Convert":
        return False
    source = node.input_value(0).get_node()
    return source.get_type_name() == "Constant" and _type_name(source.output(0)) in INTEGER_TYPES


SHAPE_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze"})
"""Ops the low-precision transformations move a FakeQuantize across (values unchanged)."""


def _under_fake_quantize(output) -> bool:
    node = output.get_node()
    while node.get_type_name() in SHAPE_OPS:
        node = node.input_value(0).get_node()
    return node.get_type_name() == "FakeQuantize"


def _quantized_input_rules(model) -> list[str]:
    problems = []
    for node in model.get_ordered_ops():
        if node.get_type_name() not in QUANTIZED_OP_TYPES:
            continue
        inputs = [node.input_value(index) for index in range(node.get_input_size())]
        under_fq = [_under_fake_quantize(value) for value in inputs]
        if not any(under_fq):
            continue
        for index, (value, quantized) in enumerate(zip(inputs, under_fq, strict=True)):
            if not quantized and not _is_integer_weight(value):
                problems.append(
                    f"{node.get_friendly_name()}: input {index} is float while another input is under "
                    "FakeQuantize (the op would run in float)"
                )
    return problems


def _constant_array(output) -> np.ndarray | None:
    node = output.get_node()
    return np.asarray(node.get_data()) if node.get_type_name() == "Constant" else None


def _unified_scale_rules(model) -> list[str]:
    problems = []
    for node in model.get_ordered_ops():
        if node.get_type_name() not in ELTWISE_TYPES:
            continue
        quantizers = [node.input_value(index).get_node() for index in range(node.get_input_size())]
        if len(quantizers) != 2 or any(q.get_type_name() != "FakeQuantize" for q in quantizers):
            continue
        ranges = [[_constant_array(q.input_value(i)) for i in (3, 4)] for q in quantizers]
        if any(bound is None for pair in ranges for bound in pair):
            continue
        same = all(np.allclose(a, b, rtol=1e-6) for a, b in zip(ranges[0], ranges[1], strict=True))  # type: ignore[arg-type]
        if not same:
            problems.append(
                f"{node.get_friendly_name()}: its two FakeQuantize inputs have different scales (unified scales required)"
            )
    return problems


def runtime_precisions(compiled) -> dict[str, set[str]]:
    """Original layer name -> the element types of the inputs its runtime node reads.

    Low-precision transformations rename a quantized MatMul ``<name>/DequantizationMultiply``:
    the part before the last ``/Dequantization`` is the name kept.
    """
    read: dict[str, set[str]] = {}
    for node in compiled.get_runtime_model().get_ordered_ops():
        info = node.get_rt_info()
        if "originalLayersNames" not in info:
            continue
        types = set()
        for index in range(node.get_input_size()):
            producer = node.input_value(index).get_node().get_rt_info()
            if "outputPrecisions" in producer:
                types.add(str(producer["outputPrecisions"].astype(str)))
        for name in str(info["originalLayersNames"].astype(str)).split(","):
            read.setdefault(name.split("/Dequantization")[0], set()).update(types)
    return read


def _runtime_rules(model, found: list[Decompression], target: Target) -> tuple[list[str], list[str]]:
    """Compile on CPU; for the CPU target, each compressed weight must stay compressed."""
    import openvino as ov

    try:
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    except Exception as exc:  # noqa: BLE001 - the plugin's refusal is the finding
        return [f"(model): OpenVINO CPU does not load the artifact: {exc}"], []
    if target.device != "CPU":
        return [], []
    precisions = runtime_precisions(compiled)
    readers = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
    problems, warnings = [], []
    for item in found:
        if item.problem or item.reader_type != "MatMul":
            continue
        kept = _read_types(item.reader, readers, precisions) & LOW_BIT_TYPES
        if item.element_type in kept:
            continue
        message = f"{item.reader}: its {item.element_type} weight is decompressed when OpenVINO CPU compiles the model"
        reader = readers.get(item.reader)
        compute = reader.get_output_element_type(0).get_type_name() if reader is not None else ""
        if compute in CPU_EXPANDED_COMPUTE_TYPES:
            warnings.append(
                message
                + f" (the CPU plugin expands the compressed weights of a {compute} graph: smaller on disk only)"
            )
        elif item.element_type in CPU_RUNTIME_COMPRESSED:
            problems.append(message)
        else:
            warnings.append(message + " (a limit of the CPU plugin for this format: smaller on disk only)")
    return problems, _summarise(warnings)


def _read_types(reader: str, readers: dict, precisions: dict[str, set[str]]) -> set[str]:
    """The types the runtime node running MatMul `reader` reads.

    OpenVINO 2026.4's CPU plugin names a FullyConnected fused with its bias Add after the Add
    alone (``originalLayersNames`` no longer lists the MatMul), so a MatMul missing from the
    runtime graph is looked up through the ops reading its output.
    """
    if reader in precisions:
        return precisions[reader]
    op = readers.get(reader)
    if op is None:
        return set()
    types: set[str] = set()
    for target in op.output(0).get_target_inputs():
        types |= precisions.get(target.get_node().get_friendly_name(), set())
    return types


def _summarise(warnings: list[str], limit: int = 3) -> list[str]:
    if len(warnings) <= limit:
        return warnings
    return [*warnings[:limit], f"... and {len(warnings) - limit} more like these"]


def check(model, target: Target, *, runtime: bool = True) -> list[str]:
    """Raise `LegalityError` listing every rule `model` breaks on `target`; return warnings."""
    found = decompressions(model)
    problems = _decompression_rules(found, target) + _quantized_input_rules(model)
    if target.unified_eltwise_scales:
        problems += _unified_scale_rules(model)
    warnings: list[str] = []
    if runtime and not problems:
        runtime_problems, warnings = _runtime_rules(model, found, target)
        problems += runtime_problems
    if problems:
        shown = "\n  ".join(_summarise(problems, 20))
        raise LegalityError(f"the {target.name} artifact breaks {len(problems)} rule(s):\n  {shown}")
    return warnings
