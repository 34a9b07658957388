"""What every pipeline stage reads: the target and its backend, the options, the report, the runtimes."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from qcompiler import calibration
from qcompiler.backend import Backend, RunnerFactory
from qcompiler.drivers.runtimes import calibration_runners, target_runners
from qcompiler.evaluation import Evaluator
from qcompiler.io import SourceFormat
from qcompiler.options import CalibrationRuntime, CompileOptions
from qcompiler.report import Report
from qcompiler.targets import Target

DataArg = Iterable[Mapping[str, np.ndarray]]


@dataclasses.dataclass
class CompileContext:
    """One compile's settled facts (replaces the stages' long parameter lists).

    Attributes:
        target: the resolved target.
        backend: its backend (from the registry).
        options: the options, resolved and adapted to the target.
        report: written by the stages, each its own section.
        source_format: what the input was read from.
        progress: show progress bars.
        evaluator: `--max-drop`'s validation evaluator (None without a budget).
    """

    target: Target
    backend: Backend
    options: CompileOptions
    report: Report
    source_format: SourceFormat
    progress: bool
    evaluator: Evaluator | None = None

    @property
    def target_runners(self) -> RunnerFactory:
        """Runs a candidate the way the target will (every `--max-drop` / budget measurement)."""
        return target_runners(self.backend)

    def collect(
        self,
        model: ir.Model,
        requests: list[calibration.StatRequest],
        data: DataArg,
        default_runtime: CalibrationRuntime,
        description: str = "calibrating",
        histogram_bins: int | None = None,
    ) -> calibration.Statistics:
        """`calibration.collect` in the user's calibration runtime (else `default_runtime`)."""
        settings = self.calibration_settings(description)
        if histogram_bins is not None:
            settings = dataclasses.replace(settings, histogram_bins=histogram_bins)
        runners = self.calibration_runners(model, default_runtime)
        return calibration.collect(model, requests, data, runners, **dataclasses.asdict(settings))

    def calibration_runners(
        self, model: ir.Model, default_runtime: CalibrationRuntime
    ) -> calibration.RunnerMaker:
        """The runner maker calibration uses for `model`."""
        return calibration_runners(self.options.calibration.runtime or default_runtime, model)

    def calibration_settings(self, description: str) -> calibration.CalibrationSettings:
        """How calibration reads the data, from the options."""
        settings = self.options.calibration
        return calibration.CalibrationSettings(
            max_batches=settings.max_batches,
            piece_bytes=settings.piece_bytes,
            progress=self.progress,
            description=description,
        )
