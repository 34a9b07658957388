"""Validation metrics for `--max-drop`: built-ins, a user's `module:function`, and the evaluator.

A metric scores a candidate model's outputs on the validation data, given the float model's
outputs on the same batches. `Evaluator` runs the float model once, then scores candidates in the
target's runtime (the runner factory the driver hands it) and turns a score into a drop against
the float model's score.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx_ir as ir

from qcompiler.backend import Feed, RunnerFactory
from qcompiler.data import input_specs, validated
from qcompiler.errors import OptionError
from qcompiler.metrics import next_token_nll, retrieval, row_cosine, sqnr_db
from qcompiler.options import AccuracyOptions, DropType
from qcompiler.precision import as_float32

CONFIDENCE = 0.95
"""Coverage of the drop's bootstrap interval in the report."""
RESAMPLES = 1000
"""Bootstrap draws of the validation batches (one metric combine each: cheap beside a model run)."""

SQNR_CAP_DB = 100.0
"""The float model's own SQNR is infinite; drops in dB are measured from this cap."""


@dataclasses.dataclass(frozen=True)
class Metric:
    """A validation metric.

    Attributes:
        name: how the report names it.
        higher_is_better: direction of the score.
        score: (candidate outputs, float outputs, feeds) -> score; outputs are one array per batch.
        output: which model output it reads; None: "logits" for perplexity, else the first output.
    """

    name: str
    higher_is_better: bool
    score: Callable[[Sequence[np.ndarray], Sequence[np.ndarray], Sequence[Feed]], float]
    output: str | None = None
    batch_terms: Callable[[np.ndarray, Feed], tuple[float, float]] | None = None
    """A metric that needs no float outputs and sums over batches (perplexity): one batch's
    (sum, count). The evaluator then streams, keeping no model outputs at all: SmolLM2's logits
    for 8 validation windows are 805 MB, for the float model and again for every candidate."""
    combine: Callable[[float, float], float] | None = None
    """(sum, count) over the batches -> the score, with `batch_terms`."""


def _rows(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.reshape(len(a), -1) for a in arrays], axis=0)


def _cosine(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], feeds: Sequence[Feed]) -> float:
    return float(np.mean(row_cosine(_rows(reference), _rows(outputs))))


def _sqnr(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], feeds: Sequence[Feed]) -> float:
    return min(sqnr_db(_rows(reference), _rows(outputs)), SQNR_CAP_DB)


def _top1(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], feeds: Sequence[Feed]) -> float:
    agree = [np.argmax(o, axis=-1) == np.argmax(r, axis=-1) for o, r in zip(outputs, reference, strict=True)]
    return float(np.mean(np.concatenate([a.reshape(-1) for a in agree])))


def _retrieval(
    outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], feeds: Sequence[Feed]
) -> float:
    """Mean reciprocal rank of each candidate embedding's own float embedding among all of them.

    Embedding models are used to rank neighbours: this asks whether the quantized embeddings still
    find the right one, not just whether they point the same way.
    """
    ranked = retrieval(_rows(outputs), _rows(reference))
    return ranked.mrr


def _perplexity_terms(logits: np.ndarray, feed: Feed) -> tuple[float, float]:
    """One batch's summed next-token NLL and its token count."""
    if "input_ids" not in feed:
        raise OptionError(
            "--metric perplexity needs token data with input_ids (--val-text ... --text-windows)"
        )
    nll, tokens = next_token_nll(logits, np.asarray(feed["input_ids"]))
    return float(nll), float(tokens)


def _perplexity_of(total: float, count: float) -> float:
    return float(np.exp(total / max(count, 1)))


def _perplexity(
    outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], feeds: Sequence[Feed]
) -> float:
    terms = [_perplexity_terms(logits, feed) for logits, feed in zip(outputs, feeds, strict=True)]
    return _perplexity_of(sum(t for t, _ in terms), sum(c for _, c in terms))


BUILTIN_METRICS: dict[str, Metric] = {
    "cosine": Metric("cosine", True, _cosine),
    "sqnr": Metric("sqnr", True, _sqnr),
    "top1": Metric("top1", True, _top1),
    "retrieval": Metric("retrieval", True, _retrieval),
    "perplexity": Metric(
        "perplexity",
        False,
        _perplexity,
        output="logits",
        batch_terms=_perplexity_terms,
        combine=_perplexity_of,
    ),
}


def user_metric(function: Callable[..., float], name: str | None = None) -> Metric:
    """Wrap ``function(outputs, feeds) -> float`` as a metric.

    Higher is better unless the function has ``higher_is_better = False``; an ``output``
    attribute names the model output it reads.
    """
    higher = bool(getattr(function, "higher_is_better", True))
    return Metric(
        name or str(getattr(function, "__name__", "user metric")),
        higher,
        lambda outputs, reference, feeds: float(function(list(outputs), list(feeds))),
        output=getattr(function, "output", None),
    )


def resolve_metric(spec: str | Callable[..., float] | Metric) -> Metric:
    """A built-in name, ``module:function``, a callable or a `Metric`; errors name ``--metric``."""
    if isinstance(spec, Metric):
        return spec
    if callable(spec):
        return user_metric(spec)
    if spec in BUILTIN_METRICS:
        return BUILTIN_METRICS[spec]
    if ":" not in spec:
        raise OptionError(
            f"--metric {spec!r}: unknown metric (built-ins: {', '.join(BUILTIN_METRICS)}; "
            "or module:function for your own)"
        )
    module_name, _, function_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module's
        raise OptionError(f"--metric {spec}: cannot import module {module_name!r}: {exc}") from exc
    function = getattr(module, function_name, None)
    if function is None:
        raise OptionError(f"--metric {spec}: module {module_name!r} has no attribute {function_name!r}")
    if not callable(function):
        raise OptionError(f"--metric {spec}: {function_name!r} is not callable")
    return user_metric(function, spec)


def model_outputs(
    model: ir.Model, feeds: Sequence[Feed], names: Sequence[str], runners: RunnerFactory
) -> list[dict[str, np.ndarray]]:
    """The named outputs (or intermediate tensors) of `model` on every batch, run by `runners(model)`."""
    return list(stream_outputs(model, feeds, names, runners))


def stream_outputs(
    model: ir.Model, feeds: Iterable[Feed], names: Sequence[str], runners: RunnerFactory
) -> Iterator[dict[str, np.ndarray]]:
    """`model_outputs` one batch at a time (many intermediate tensors need not fit at once)."""
    inputs = {str(value.name) for value in model.graph.inputs}
    computed = [name for name in names if name not in inputs]  # inputs come from the feed, not a runtime
    graph_outputs = {str(value.name) for value in model.graph.outputs}
    if not set(computed) <= graph_outputs:
        model = _exposing(model, computed)
    feeds = list(feeds)  # read twice: by the runner, and for the requested inputs
    for feed, outputs in zip(feeds, runners(model).run_all(computed, feeds), strict=True):
        found = dict(zip(computed, (as_float32(output) for output in outputs), strict=True))
        yield {name: found[name] if name in found else np.asarray(feed[name]) for name in names}


def _exposing(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A clone of `model` whose outputs are the named tensors."""
    clone = model.clone()
    values = {str(v.name): v for node in clone.graph for v in node.outputs}
    values.update({str(v.name): v for v in clone.graph.inputs})
    clone.graph.outputs.clear()
    for name in names:
        if name not in values:
            raise OptionError(f"model has no tensor named {name!r}")
        clone.graph.outputs.append(values[name])
    return clone


class Evaluator:
    """Scores candidate models on the validation data against the float model.

    Args:
        reference: the float model (run once, here).
        feeds: validation batches.
        metric: the metric.
        runners: where models run (the target's runtime).
        drop_type: absolute or relative drop.
    """

    def __init__(
        self,
        reference: ir.Model,
        feeds: Sequence[Feed],
        metric: Metric,
        runners: RunnerFactory,
        drop_type: DropType = DropType.ABSOLUTE,
    ) -> None:
        self.runners = runners
        if not feeds:
            raise OptionError("validation data is empty")
        self.feeds = list(feeds)
        self.metric = metric
        self.drop_type = drop_type
        outputs = [str(value.name) for value in reference.graph.outputs]
        self.output = metric.output or outputs[0]
        if self.output not in outputs:
            raise OptionError(
                f"--metric {metric.name}: the model has no output {self.output!r} (outputs: {', '.join(outputs)})"
            )
        self.reference: list[np.ndarray] = []
        self._reference_terms: list[tuple[float, float]] = []
        if metric.batch_terms is not None:  # streamed: no outputs kept
            self._reference_terms = self._terms(reference, self.feeds)
            self.float_score = self._combine(self._reference_terms)
            return
        self.reference = [
            batch[self.output] for batch in model_outputs(reference, self.feeds, [self.output], runners)
        ]
        self.float_score = self._score(self.reference, self.feeds, self.reference)

    def _terms(self, model: ir.Model, feeds: Sequence[Feed]) -> list[tuple[float, float]]:
        """Each batch's (sum, count) of a streaming metric; every output is dropped once reduced."""
        assert self.metric.batch_terms is not None
        return [
            self.metric.batch_terms(batch[self.output], feed)
            for batch, feed in zip(
                stream_outputs(model, feeds, [self.output], self.runners), feeds, strict=True
            )
        ]

    def _combine(self, terms: Sequence[tuple[float, float]]) -> float:
        assert self.metric.combine is not None
        return float(self.metric.combine(sum(t for t, _ in terms), sum(c for _, c in terms)))

    def _score(
        self, outputs: Sequence[np.ndarray], feeds: Sequence[Feed], reference: Sequence[np.ndarray]
    ) -> float:
        return float(self.metric.score(outputs, reference, feeds))

    def score(self, model: ir.Model, batches: int | None = None) -> float:
        """The metric of `model` on the validation data (the first `batches` only, if given)."""
        feeds = self.feeds[:batches] if batches else self.feeds
        if self.metric.batch_terms is not None:
            return self._combine(self._terms(model, feeds))
        outputs = [batch[self.output] for batch in model_outputs(model, feeds, [self.output], self.runners)]
        return self._score(outputs, feeds, self.reference[: len(feeds)])

    def subset_float_score(self, batches: int) -> float:
        """The float model's score on the first `batches` batches."""
        if self.metric.batch_terms is not None:
            return self._combine(self._reference_terms[:batches])
        return self._score(self.reference[:batches], self.feeds[:batches], self.reference[:batches])

    def uncertainty(
        self, model: ir.Model, *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES
    ) -> dict[str, object]:
        """How sure `model`'s drop is: a paired bootstrap interval over the validation data.

        Units (token windows for a streamed metric such as perplexity, samples for the others:
        each batch is split into its rows) are drawn with replacement, the same draw for the float
        model and the candidate, and the drop is recomputed on each draw; the interval is the
        central `confidence` of those drops. Seeded: the same data gives the same interval.
        """
        rng = np.random.default_rng(0)
        drops: list[float] = []
        if self.metric.batch_terms is not None:
            picks = rng.integers(0, len(self.feeds), size=(resamples, len(self.feeds)))
            assert self.metric.combine is not None
            combine = self.metric.combine
            terms = np.array(self._terms(model, self.feeds), dtype=np.float64)  # (batches, [sum, count])
            float_terms = np.array(self._reference_terms, dtype=np.float64)
            for pick in picks:
                drawn, float_drawn = terms[pick].sum(axis=0), float_terms[pick].sum(axis=0)
                drops.append(self.drop(combine(*drawn), combine(*float_drawn)))
            score = float(combine(*terms.sum(axis=0)))
        else:
            outputs = [b[self.output] for b in model_outputs(model, self.feeds, [self.output], self.runners)]
            score = self._score(outputs, self.feeds, self.reference)
            rows, float_rows, feed_rows = (
                _samples(outputs),
                _samples(self.reference),
                _feed_samples(self.feeds),
            )
            for pick in rng.integers(0, len(rows), size=(resamples, len(rows))):
                feeds = [feed_rows[i] for i in pick]
                reference = [float_rows[i] for i in pick]
                candidate_score = self._score([rows[i] for i in pick], feeds, reference)
                drops.append(self.drop(candidate_score, self._score(reference, feeds, reference)))
        low, high = np.quantile(np.array(drops), [(1 - confidence) / 2, (1 + confidence) / 2])
        return {
            "drop": self.drop(score),
            "interval": [round(float(low), 6), round(float(high), 6)],
            "confidence": confidence,
            "resampled": f"{len(self.feeds)} validation batches, {resamples} paired bootstrap draws",
        }

    def describe(self) -> dict[str, object]:
        """What the drop is measured on: batches, samples and, for token data, context length and tokens."""
        first = self.feeds[0]
        found: dict[str, object] = {
            "batches": len(self.feeds),
            "samples": int(sum(len(next(iter(feed.values()))) for feed in self.feeds)),
        }
        if "input_ids" in first and np.asarray(first["input_ids"]).ndim == 2:
            lengths = [np.asarray(feed["input_ids"]).shape[1] for feed in self.feeds]
            found["context_tokens"] = max(lengths)
            found["tokens"] = int(sum(np.asarray(feed["input_ids"]).size for feed in self.feeds))
        return found

    def drop(self, score: float, float_score: float | None = None) -> float:
        """How much worse `score` is than the float model's (positive = worse)."""
        base = self.float_score if float_score is None else float_score
        drop = base - score if self.metric.higher_is_better else score - base
        if self.drop_type is DropType.RELATIVE:
            drop /= max(abs(base), 1e-12)
        return drop


def _samples(batches: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each batch's rows as batches of one (the unit a per-sample metric averages over)."""
    return [batch[index : index + 1] for batch in batches for index in range(len(batch))]


def _feed_samples(feeds: Sequence[Feed]) -> list[Feed]:
    """The feeds split the same way, row by row."""
    return [
        {name: np.asarray(array)[index : index + 1] for name, array in feed.items()}
        for feed in feeds
        for index in range(len(next(iter(feed.values()))))
    ]


def validation_evaluator(
    model: ir.Model, validation: Iterable[Feed], accuracy: AccuracyOptions, runners: RunnerFactory
) -> Evaluator:
    """The validation metric on the float model (default: perplexity for an LM, else cosine)."""
    spec = accuracy.metric
    if spec is None:
        outputs = {str(value.name) for value in model.graph.outputs}
        inputs = {str(value.name) for value in model.graph.inputs}
        spec = "perplexity" if "logits" in outputs and "input_ids" in inputs else "cosine"
    metric = resolve_metric(spec)  # type: ignore[arg-type]
    if accuracy.metric_output is not None:
        metric = dataclasses.replace(metric, output=accuracy.metric_output)
    feeds = list(validated(validation, input_specs(model), "validation data"))  # each batch checked as read
    return Evaluator(model, feeds, metric, runners, accuracy.drop_type)
