"""The onnx package's backend test models (pytorch-converted, pytorch-operator, simple) as real inputs.

They ship inside the ``onnx`` wheel with one or more ``test_data_set_*`` folders of input and
expected output tensors: old opsets (6-9), IR versions below 4, initializers listed as graph
inputs, exporters' odd shapes. `cases()` lists them; `load_case` gives the model path, its input
feeds and the expected output shapes.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

SUITES = ("pytorch-converted", "pytorch-operator", "simple")


@dataclasses.dataclass(frozen=True)
class Case:
    """One backend test model and its first test data set."""

    suite: str
    name: str
    model: pathlib.Path
    inputs: dict[str, np.ndarray]
    output_shapes: list[tuple[int, ...]]


def data_root() -> pathlib.Path:
    """The backend test data folder of the installed onnx package."""
    import onnx

    return pathlib.Path(onnx.__file__).parent / "backend" / "test" / "data"


def case_folders(suites: tuple[str, ...] = SUITES) -> list[pathlib.Path]:
    """Every model folder of `suites`, sorted."""
    root = data_root()
    return sorted(
        folder for suite in suites for folder in (root / suite).iterdir() if (folder / "model.onnx").exists()
    )


def load_case(folder: pathlib.Path) -> Case:
    """The model, its inputs (named as the graph's non-initializer inputs) and expected output shapes."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(folder / "model.onnx", load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    names = [value.name for value in model.graph.input if value.name not in initializers]
    data = folder / "test_data_set_0"

    def tensors(prefix: str) -> list[np.ndarray]:
        files = sorted(data.glob(f"{prefix}_*.pb"), key=lambda p: int(p.stem.split("_")[-1]))
        return [numpy_helper.to_array(onnx.load_tensor(str(file))) for file in files]

    inputs = dict(zip(names, tensors("input"), strict=False))
    outputs = [tuple(array.shape) for array in tensors("output")]
    return Case(folder.parent.name, folder.name, folder / "model.onnx", inputs, outputs)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What compiling one case gave.

    ``compiled`` (and ran with the expected output shapes), ``wrong shapes``, ``named error`` (a
    `QCompileError`, its first line kept) or ``crash``.
    """

    case: str
    kind: str
    detail: str = ""
    upgraded_from: int | None = None


def compile_case(case: Case, target: str, options, work: pathlib.Path) -> Outcome:
    """Compile `case` for `target` calibrated on its own inputs, save, run the artifact, compare shapes."""
    import qcompiler
    from qcompiler.errors import QCompileError
    from qcompiler.registry import backend_for

    name = f"{case.suite}/{case.name}"
    try:
        result = qcompiler.compile(case.model, target, options, data=[case.inputs], progress=False)
        output = result.save(work / f"{case.name}.{target}{backend_for(target).artifact_suffix}")
        runner = backend_for(target).runner(output)
        shapes = [tuple(array.shape) for array in runner.run(runner.output_names, case.inputs)]
    except QCompileError as exc:
        return Outcome(name, "named error", str(exc).splitlines()[0])
    except Exception as exc:  # noqa: BLE001 - a crash is the finding
        return Outcome(name, "crash", f"{type(exc).__name__}: {exc}".splitlines()[0])
    upgraded = result.report.model.get("opset") if "opset_upgraded_to" in result.report.model else None
    if shapes[: len(case.output_shapes)] != case.output_shapes:
        return Outcome(name, "wrong shapes", f"{shapes} != {case.output_shapes}", upgraded)
    return Outcome(name, "compiled", "", upgraded)
