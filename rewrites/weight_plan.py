"""What weight-only compression will do: the units (weights), their roles and formats, and the statistics they need.

Planning reads the graph and the options: every MatMul with a constant 2-D float weight is a
unit; with the default policy (after NNCF's) the embeddings (Gather on a constant table) and the
last MatMul (the LM head) stay INT8 asymmetric, in 64/128-row blocks (`backup_block`). Nothing
is edited here; `rewrites/compression.py` runs the algorithms on the plan.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import numpy as np
import onnx_ir as ir

from qcompiler.calibration import StatRequest
from qcompiler.irutil import release_mapped
from qcompiler.options import CompressionOptions, IgnoredScope, WeightFormat
from qcompiler.precision import FLOAT_TYPES
from qcompiler.weight_formats import resolve_block_size

BACKUP_FORMAT = WeightFormat.INT8


class WeightRole(str, enum.Enum):
    """What a compressed weight is to the model (the report writes the value)."""

    MATMUL = "matmul"
    HEAD = "head"
    """The last MatMul (an LM head): the backup format by NNCF's policy."""
    EMBEDDING = "embedding"
    """A Gather's table [V, H]: compressed along H, the backup format by NNCF's policy."""


@dataclasses.dataclass
class WeightUnit:
    """One weight to compress and how.

    Attributes:
        node: the MatMul (weight = input 1, [K, N]) or Gather (table = input 0, [V, H]).
        role: what the weight is (`WeightRole`).
        format, symmetric, group_size: the format chosen for this weight.
    """

    node: ir.Node
    role: WeightRole
    format: WeightFormat
    symmetric: bool
    group_size: int

    @property
    def weight(self) -> ir.Value:
        """The constant weight (MatMul's B or the Gather's table)."""
        value = self.node.inputs[0 if self.role is WeightRole.EMBEDDING else 1]
        assert value is not None
        return value

    @property
    def activation(self) -> ir.Value | None:
        """The input whose statistics the algorithms use (None for an embedding)."""
        return None if self.role is WeightRole.EMBEDDING else self.node.inputs[0]

    def matrix(self) -> np.ndarray:
        """The weight as [input channels, outputs]: MatMul's B, or the transposed table.

        A table's rows are quantized along H, one scale per block of a row.
        """
        tensor = self.weight.const_value
        array = tensor.numpy()  # type: ignore[union-attr]
        if isinstance(tensor, ir.ExternalTensor):  # a copy, so the file's pages can go
            array = np.array(array, np.float32)
            release_mapped(tensor)
        return np.asarray(array.T if self.role is WeightRole.EMBEDDING else array, np.float32)

    @property
    def rows(self) -> int:
        """Input channels of `matrix()`: MatMul's K, or an embedding's hidden size."""
        dims = self.weight.const_value.shape  # type: ignore[union-attr]
        return int(dims[1] if self.role is WeightRole.EMBEDDING else dims[0])  # type: ignore[arg-type]

    @property
    def size(self) -> int:
        """Number of weight values."""
        return int(np.prod(self.weight.shape.numpy()))  # type: ignore[union-attr]


def _const_float_2d(value: ir.Value | None) -> bool:
    return (
        value is not None
        and value.const_value is not None
        and value.dtype in FLOAT_TYPES
        and len(value.const_value.shape) == 2
    )


def plan_compression(
    model: ir.Model, options: CompressionOptions, ignored: IgnoredScope
) -> tuple[list[WeightUnit], dict[str, str]]:
    """The weights to compress, with their formats, and the skipped nodes with the reason."""
    units: list[WeightUnit] = []
    skipped: dict[str, str] = {}
    main = (options.format, options.symmetric, options.group_size)
    symmetric = options.symmetric_backups
    backup = (BACKUP_FORMAT, symmetric, 0) if options.backup_layers else main
    blocks = backup_block if options.backup_layers and not symmetric else lambda rows: 0
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gather", "Gemm"):
            continue
        name = str(node.name)
        if ignored.matches(node):
            skipped[name] = "ignored scope"
        elif node.op_type == "Gemm":
            if _const_float_2d(node.inputs[1]):
                skipped[name] = "Gemm weights are not compressed yet (MatMul only)"
        elif node.op_type == "MatMul" and _const_float_2d(node.inputs[1]):
            units.append(WeightUnit(node, WeightRole.MATMUL, *main))
        elif (
            node.op_type == "Gather"
            and node.attributes.get_int("axis", 0) == 0
            and _const_float_2d(node.inputs[0])
        ):
            embedding = WeightUnit(node, WeightRole.EMBEDDING, *backup)
            embedding.group_size = embedding.group_size or blocks(embedding.rows)
            units.append(embedding)
    matmuls = [unit for unit in units if unit.role is WeightRole.MATMUL]
    if matmuls and options.backup_layers:
        matmuls[-1].role = WeightRole.HEAD
        head = matmuls[-1]
        head.format, head.symmetric, head.group_size = backup
        head.group_size = head.group_size or blocks(head.rows)
    return units, skipped


def backup_block(rows: int) -> int:
    """Blocks of the INT8 backup layers: the largest power of two <= 128 dividing `rows`, else 0.

    Per-channel INT8 on an LM head cost SmolLM2 1.8 perplexity points that 64-row blocks win
    back for 1.5 % more bytes; gathering kernels want power-of-two blocks; 0 = per-channel.
    """
    for size in (128, 64, 32, 16):
        if rows % size == 0:
            return size
    return 0


def stat_requests(units: list[WeightUnit], options: CompressionOptions) -> list[StatRequest]:
    """Gram matrices of the MatMul inputs (the head's too), when an algorithm needs them.

    GPTQ needs the full matrix; the other algorithms only its diagonal blocks, collected in
    blocks that tile every quantization block reading the input (per-channel included, as
    `--ratio` may move a weight to INT8 per channel), at a fraction of the cost.
    """
    if not options.needs_data:
        return []
    blocks: dict[str, tuple[ir.Value, int]] = {}
    for unit in units:
        activation = unit.activation
        if unit.role is WeightRole.EMBEDDING or activation is None or activation.const_value is not None:
            continue
        size = math.gcd(resolve_block_size(unit.format, unit.group_size, unit.rows), unit.rows)
        name = str(activation.name)
        blocks[name] = (activation, math.gcd(blocks[name][1], size) if name in blocks else size)
    return [
        StatRequest.gram(activation, 0 if options.gptq or size < 16 else size)
        for activation, size in blocks.values()
    ]


def input_name(unit: WeightUnit) -> str | None:
    """The name of the tensor whose statistics `unit` uses (None for an embedding)."""
    return None if unit.activation is None else str(unit.activation.name)
