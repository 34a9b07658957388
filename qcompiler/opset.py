"""Raising a model's default-domain opset (onnxscript's version converter, plus what it misses).

Some weight formats need a newer DequantizeLinear than the model was exported with (FP8: opset 19,
blocked INT4: 21). onnxscript's converter adapts most ops but leaves the `axes` attribute on
ReduceL1/L2/LogSum/... , which opset 18 moved to an input (onnxruntime then rejects the model:
"Unrecognized attribute: axes for operator ReduceL2", seen on MiniLM); `upgrade_opset` moves it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import version_converter

from qcompiler.irutil import add_initializer

AXES_TO_INPUT_AT_18 = frozenset(
    {
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceMax",
        "ReduceMean",
        "ReduceMin",
        "ReduceProd",
        "ReduceSumSquare",
    }
)
"""Reductions whose `axes` became an input at opset 18 (ReduceSum did at 13)."""


OLD_OPSET = 13
"""Models below this opset are upgraded by onnx's C++ version converter."""


def upgrade_opset(model: ir.Model, version: int) -> bool:
    """Raise the default-domain opset to `version` in place; False if it already was."""
    current = model.opset_imports.get("", 0)
    if current >= version:
        return False
    # Below opset 13 (old CNN exports) onnx's own C++ converter does the work (onnxscript's
    # falls back to it); from 13 on, onnxscript's converts in memory without serializing the
    # weights (an LLM's external data stays lazy).
    version_converter.convert_version(model, target_version=version, fallback=current < OLD_OPSET)
    if current < 18 <= version:
        for node in model.graph:
            if (
                node.op_type in AXES_TO_INPUT_AT_18
                and node.domain in ("", "ai.onnx")
                and "axes" in node.attributes
            ):
                axes = node.attributes.pop("axes").as_ints()
                node.resize_inputs(2)
                node.replace_input_with(
                    1, add_initializer(model.graph, f"{node.name}_axes", np.array(axes, np.int64))
                )
    model.opset_imports[""] = version
    return True
