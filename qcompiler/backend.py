"""The `Backend` and `Runner` contracts: what the drivers need from a runtime, and nothing else.

Core and the drivers run models only through a `Runner` (output names, feeds -> arrays) that a
`Backend` makes; the backend for a target comes from `qcompiler.registry`. A backend lowers the
canonical graph into its runtime's form, checks it, exports the runtime's own artifact, saves it
atomically and says what more it can do through `Capabilities` (never probed with `hasattr`).
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import os
import pathlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import onnx_ir as ir

from qcompiler.precision import FLOAT_TYPES

if TYPE_CHECKING:
    from qcompiler.targets import Target

Feed = Mapping[str, np.ndarray]
ModelRef = ir.Model | str | os.PathLike[str] | object
"""What a runner runs: an `ir.Model`, a saved artifact's path, or the runtime's own model."""
PathArg = str | os.PathLike[str]


class Precision(enum.Enum):
    """The float precision a runner computes in (its outputs are float32 either way)."""

    F32 = "f32"
    BF16 = "bf16"


@dataclasses.dataclass(frozen=True)
class RunnerSettings:
    """How a runner runs.

    Attributes:
        precision: the float precision it computes in.
        threads: threads per inference (None: the runtime's default).
        streams: feeds `run_all` may run at once (runtimes with `Capabilities.concurrent_streams`).
        lean: the runner reads a few batches (calibration): the runtime may trade speed for memory.
    """

    precision: Precision = Precision.F32
    threads: int | None = None
    streams: int = 1
    lean: bool = False


DEFAULT_RUNNER = RunnerSettings()


class Runner(Protocol):
    """A model compiled in a runtime: named outputs for feeds (one call shape for every runtime)."""

    @property
    def output_names(self) -> Sequence[str]:
        """The model's output names."""
        ...

    def run(self, names: Sequence[str], feed: Feed) -> list[np.ndarray]:
        """The named outputs for one feed."""
        ...

    def run_all(self, names: Sequence[str], feeds: Iterable[Feed]) -> Iterator[list[np.ndarray]]:
        """The named outputs of each feed, in order (a runtime may run several feeds at once)."""
        ...


class SessionRunner:
    """A `Runner` over an onnxruntime ``InferenceSession`` (duck-typed: core imports no runtime).

    Shared by the backends that execute ONNX in onnxruntime (its own target, and TensorRT's CPU
    verification); each makes the session with its own options.
    """

    def __init__(self, session: Any) -> None:
        self.session = session
        self.output_names = [output.name for output in session.get_outputs()]

    def run(self, names: Sequence[str], feed: Feed) -> list[np.ndarray]:
        """The named outputs for one feed."""
        return self.session.run(list(names), dict(feed))

    def run_all(self, names: Sequence[str], feeds: Iterable[Feed]) -> Iterator[list[np.ndarray]]:
        """The named outputs of each feed, in order (onnxruntime parallelizes inside one run)."""
        for feed in feeds:
            yield self.run(names, feed)


class RunnerFactory(Protocol):
    """Makes the runner of a model (a backend's `runner`, with its settings bound)."""

    def __call__(self, model: ir.Model) -> Runner:
        """The runner of `model`."""
        ...


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend does beyond lowering, checking, exporting and running.

    Attributes:
        counts_fusion: `count_fusion` reads the runtime's own optimized graph back.
        fuses_decoder: `fuse_decoder` lowers a decoder's attention / RMSNorm to fused kernels.
        runs_openvino_ir: its runners run a model read from OpenVINO IR (OpenVINO-only ops).
        concurrent_streams: its runners run several feeds at once when given ``streams`` > 1.
        artifact_is_onnx: the saved artifact is the compiled ONNX model itself (else `export`
            makes the runtime's own model from it).
        precisions: the model precisions (float element types) its runners run.
    """

    counts_fusion: bool = False
    fuses_decoder: bool = False
    runs_openvino_ir: bool = False
    concurrent_streams: bool = False
    artifact_is_onnx: bool = True
    precisions: frozenset[ir.DataType] = FLOAT_TYPES


class Backend(abc.ABC):
    """One runtime: lowering, checking, exporting, saving and running (see the module docstring).

    Attributes:
        name: the name `Target.backend` refers to.
        artifact_suffix: the file suffix of a saved artifact.
        capabilities: what it can do beyond the abstract methods.
    """

    name: str
    artifact_suffix: str
    capabilities: Capabilities

    @abc.abstractmethod
    def runner(self, model: ModelRef, settings: RunnerSettings = DEFAULT_RUNNER) -> Runner:
        """A runner of `model` (an `ir.Model`, a saved artifact's path, or this runtime's own model)."""

    def supports(self, precision: Precision) -> bool:
        """Whether this machine runs `precision` in this runtime (f32 always)."""
        return precision is Precision.F32

    def unknown_ops(self, model: ir.Model) -> list[ir.Node]:
        """Nodes of an input model whose op this runtime does not have, checked before any work.

        Default: standard ONNX ops only (onnx's own schemas); a backend whose runtime has more
        (contrib domains, its own dialect) says so.
        """
        return [node for node in model.graph if not is_standard_op(node)]

    def lower(self, model: ir.Model) -> None:
        """Rewrite the canonical QDQ form into what the runtime fuses, in place.

        Nothing by default: a backend whose runtime reads the canonical form converts it in `export`.
        """
        return None

    @abc.abstractmethod
    def lower_weights(
        self, model: ir.Model, accuracy_level: int = 4, int8_accuracy_level: int = 0
    ) -> dict[str, str]:
        """Lower canonical compressed weights in place; returns reader node -> kernel or element type."""

    def check(self, model: ir.Model) -> None:
        """Raise `LegalityError` where the lowered ONNX breaks the runtime's rules.

        Nothing by default: a backend that exports its own model checks that artifact in `export`.
        """
        return None

    def export(self, model: ir.Model, target: Target) -> tuple[object | None, list[str]]:
        """The runtime's own checked model (None when the ONNX model is the artifact) and warnings."""
        return None, []

    @abc.abstractmethod
    def save(self, model: ir.Model, artifact: object | None, path: PathArg, **options: Any) -> pathlib.Path:
        """Write the artifact (or the ONNX model) to `path` atomically.

        Options: ``protected``, files never written (the input model's); ``external_data`` (ONNX
        artifacts), weights in ``<name>.data`` (None decides by size).
        """

    def count_fusion(self, model: ir.Model, quantized_nodes: Sequence[str]) -> dict[str, object]:
        """Which quantized nodes the runtime fused, and into what (`capabilities.counts_fusion`)."""
        raise NotImplementedError(f"{self.name} does not count fusion")

    def fuse_decoder(self, model: ir.Model, *, attention: bool = True) -> dict[str, int]:
        """Fuse a decoder's attention / norms in place; the count per kernel (`capabilities.fuses_decoder`)."""
        raise NotImplementedError(f"{self.name} has no decoder fusions")

    def finalize(self, model: ir.Model) -> list[str]:
        """The last rewrite of the compiled model, after every stage; report lines (default: none).

        For what concerns the whole graph rather than one stage (onnxruntime: an FP16 model computes
        in FP32 on its CPU kernels).
        """
        return []


def is_standard_op(node: ir.Node) -> bool:
    """Whether `node` is an op of the ONNX standard (``ai.onnx`` or ``ai.onnx.ml``) that onnx knows."""
    import onnx

    domain = "" if node.domain == "ai.onnx" else node.domain
    return domain in ("", "ai.onnx.ml") and onnx.defs.has(node.op_type, domain)


def median_latency_ms(runner: Runner, feed: Feed, *, warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time of one run of every output on `feed`, in milliseconds."""
    names = list(runner.output_names)
    for _ in range(warmup):
        runner.run(names, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.run(names, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)
