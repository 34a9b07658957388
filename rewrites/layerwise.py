"""Layer-wise compression: each piece of the model compressed as soon as calibration finishes it."""

from __future__ import annotations

import onnx_ir as ir

from qcompiler.calibration import Statistics, StatRequest
from qcompiler.options import CompressionOptions, IgnoredScope
from qcompiler.reducers import Gram
from qcompiler.rewrites.compression import compress_weights, gram_statistics
from qcompiler.rewrites.weight_plan import WeightUnit, input_name


class LayerwiseCompression:
    """Compress each layer as soon as calibration has finished its statistics (`collect`'s `on_piece`).

    Scale estimation, GPTQ, RTN and HQQ treat every weight on its own, and AWQ needs one input
    group's statistics and the weights it folds into, which pieces cut between blocks keep
    together; so a piece's Gram matrices are used and dropped before the next piece runs, and
    GPTQ's full matrices (SmolLM2: 400 MB) never all exist. (Calibration never cuts inside an AWQ
    group's span, `compression.awq_spans`; a group left split anyway is left unscaled, reported.)
    `--ratio` ranks all layers against each other and does not stream.
    """

    def __init__(
        self,
        model: ir.Model,
        units: list[WeightUnit],
        requests: list[StatRequest],
        options: CompressionOptions,
        ignored: IgnoredScope,
    ) -> None:
        self.model = model
        self.order = [str(unit.node.name) for unit in units]
        self.remaining = list(units)
        self.requests = requests
        self.options = options
        self.ignored = ignored
        self.layers: dict[str, dict[str, object]] = {}
        self.awq: dict[str, object] = {}

    @staticmethod
    def applies(options: CompressionOptions) -> bool:
        """Whether the requested algorithms can run layer by layer."""
        return options.ratio >= 1.0

    def __call__(self, statistics: Statistics) -> None:
        """Compress the units whose input statistics `statistics` holds."""
        grams = gram_statistics(statistics, self.requests)
        ready = [unit for unit in self.remaining if input_name(unit) in grams]
        if ready:
            self._compress(ready, grams)

    def finish(self, grams: dict[str, Gram]) -> dict[str, object]:
        """Compress what is left (weights without statistics); the report section, in plan order."""
        self._compress(self.remaining, grams)
        return {
            "layers": {name: self.layers[name] for name in self.order if name in self.layers},
            "awq": self.awq,
        }

    def _compress(self, units: list[WeightUnit], grams: dict[str, Gram]) -> None:
        section = compress_weights(self.model, units, grams, self.options, self.ignored, progress=False)
        self.layers.update(section["layers"])  # type: ignore[arg-type]
        self.awq.update(section["awq"])  # type: ignore[arg-type]
        done = {id(unit) for unit in units}
        self.remaining = [unit for unit in self.remaining if id(unit) not in done]
