"""Accuracy-aware fallback and size budgets: groups, ladders, the search, metrics, error paths."""

import itertools
import json
import re
import sys

import numpy as np
import onnx_ir as ir
import pytest

import qcompiler
from qcompiler import io
from qcompiler.cli import EXIT_BUDGET_NOT_MET, main
from qcompiler.drivers.accuracy import static_ladder, weight_ladder
from qcompiler.drivers.runtimes import target_runners
from qcompiler.drivers.static_fallback import static_groups
from qcompiler.drivers.weight_budget import weight_groups
from qcompiler.errors import OptionError
from qcompiler.evaluation import Evaluator, resolve_metric
from qcompiler.options import CompileOptions, CompressionOptions, DropType, IgnoredScope, Preset, WeightFormat
from qcompiler.registry import backend_named
from qcompiler.rewrites.fallback import QuantGroup, rank, search
from qcompiler.rewrites.mixed_precision import choose_formats
from qcompiler.rewrites.normalize import NormalizePass
from qcompiler.rewrites.placement import plan_quantizers
from qcompiler.rewrites.smoothing import find_groups
from qcompiler.rewrites.weight_plan import plan_compression
from qcompiler.targets import ORT_CPU
from tests.graphs import add, const, float_input, mlp_with_attention_matmul, model_of, random_feeds
from tests.test_compression import _feeds as decoder_feeds
from tests.test_compression import tiny_decoder

# Groups and ladders --------------------------------------------------------------------------


def _normalized(model: ir.Model) -> ir.Model:
    NormalizePass()(model)  # shape inference: placement needs the input types
    return model


def test_units_sharing_an_activation_form_one_group():
    model = _normalized(mlp_with_attention_matmul())
    plan = plan_quantizers(model, ORT_CPU, CompileOptions(preset=Preset.DEFAULT))
    groups = {tuple(group.members): group.ladder for group in static_groups(plan, ORT_CPU)}
    # fc2 and fc3 read relu's output; scores reads fc2's and the transposed fc3's outputs.
    assert groups == {
        ("fc1",): ("w8a8", "w8", "float"),
        ("fc2", "fc3"): ("w8a8", "w8", "float"),
        ("scores",): ("a8", "float"),
    }


def test_smoothquant_groups_stay_together():
    model = _normalized(mlp_with_attention_matmul())
    plan = plan_quantizers(model, ORT_CPU, CompileOptions(preset=Preset.TRANSFORMER))
    members = [set(group.members) for group in static_groups(plan, ORT_CPU)]
    for smoothing in find_groups(model, IgnoredScope()):
        names = {str(node.name) for node in smoothing.consumers}
        assert any(names <= group for group in members)


def test_weight_groups_follow_shared_inputs_and_the_format_ladder():
    units, _ = plan_compression(tiny_decoder(), CompressionOptions(group_size=32), IgnoredScope())
    groups = {tuple(g.members): g.ladder for g in weight_groups(units, ORT_CPU)}
    assert groups == {
        ("embed",): ("int8", "float"),
        ("q_proj", "k_proj"): ("int4", "int8", "float"),
        ("o_proj",): ("int4", "int8", "float"),
        ("lm_head",): ("int8", "float"),
    }


def test_ladder_order_per_target():
    assert ORT_CPU.weight_ladder == ("int4", "int8", "float")
    assert weight_ladder(WeightFormat.INT4, ORT_CPU) == ("int4", "int8", "float")
    assert weight_ladder(WeightFormat.NF4, ORT_CPU) == ("nf4", "int8", "float")
    assert weight_ladder(WeightFormat.INT8, ORT_CPU) == ("int8", "float")
    assert weight_ladder(WeightFormat.FP8, ORT_CPU) == ("fp8", "float")
    assert static_ladder(ORT_CPU, weighted=True) == ("w8a8", "w8", "float")
    assert static_ladder(ORT_CPU, weighted=False) == ("a8", "float")


# The search on a closed-form drop -------------------------------------------------------------


def _additive(harms):
    """Score = 1 - sum of the harm left at each group's rung (harms[g][rung])."""
    calls = []

    def evaluate(decision):
        calls.append(decision)
        return 1.0 - sum(harms[g][rung] for g, rung in enumerate(decision))

    return evaluate, calls


def _groups(harms):
    return [
        QuantGroup(f"g{i}", [f"n{i}"], ("int4", "int8", "float")[: len(h)], proxy=h[0])
        for i, h in enumerate(harms)
    ]


HARMS = [(0.05, 0.01, 0.0), (0.002, 0.0), (0.03, 0.0, 0.0), (0.001, 0.0), (0.004, 0.0)]


def test_search_meets_the_budget_with_the_fewest_moved_groups():
    evaluate, _ = _additive(HARMS)
    groups = _groups(HARMS)
    result = search(groups, rank(groups), evaluate, lambda s: 1.0 - s, 0.02)
    assert result.met and result.drop <= 0.02
    # Brute force: the cheapest decisions (fewest rungs moved) that meet the budget.
    best = min(
        sum(d)
        for d in itertools.product(*(range(len(h)) for h in HARMS))
        if sum(HARMS[g][r] for g, r in enumerate(d)) <= 0.02
    )
    assert sum(result.decision) == best
    assert result.decision == (1, 0, 1, 0, 0)
    assert result.contributions["g0"] == pytest.approx(0.04)  # measured by stepping it back up


def test_search_is_deterministic_and_caches():
    first_eval, first_calls = _additive(HARMS)
    second_eval, _ = _additive(HARMS)
    one = search(_groups(HARMS), rank(_groups(HARMS)), first_eval, lambda s: 1.0 - s, 0.005)
    two = search(_groups(HARMS), rank(_groups(HARMS)), second_eval, lambda s: 1.0 - s, 0.005)
    assert one.decision == two.decision and [t.action for t in one.trials] == [t.action for t in two.trials]
    assert len(first_calls) == len(set(first_calls))  # each decision measured once


def test_search_stops_at_max_trials_and_says_so():
    evaluate, _ = _additive(HARMS)
    groups = _groups(HARMS)
    result = search(groups, rank(groups), evaluate, lambda s: 1.0 - s, 0.0, max_trials=1)
    assert not result.met and result.stopped_by == "max trials (1)" and len(result.trials) == 1


def test_rank_puts_measured_gains_first_then_proxy():
    groups = _groups(HARMS)
    assert rank(groups) == [0, 2, 4, 1, 3]
    assert rank(groups, {3: 0.5, 1: 0.7}) == [1, 3, 0, 2, 4]


# Integer program -------------------------------------------------------------------------------


def test_choose_formats_matches_brute_force():
    rng = np.random.default_rng(0)
    costs = rng.random((6, 2)).tolist()
    sizes = [[4.0 * n, 8.0 * n] for n in rng.integers(1, 10, 6)]
    budget = 0.7 * sum(s[1] for s in sizes)
    chosen = choose_formats(costs, sizes, budget)
    best = min(
        (sum(costs[u][c] for u, c in enumerate(d)), d)
        for d in itertools.product(range(2), repeat=6)
        if sum(sizes[u][c] for u, c in enumerate(d)) <= budget
    )
    assert sum(costs[u][c] for u, c in enumerate(chosen)) == pytest.approx(best[0])
    with pytest.raises(OptionError, match="below the smallest"):
        choose_formats(costs, sizes, 1.0)


def test_effective_bits_fits_the_budget_on_a_decoder():
    options = CompileOptions(
        compression=CompressionOptions(group_size=32, symmetric=True),
        accuracy=qcompiler.AccuracyOptions(effective_bits=6.0),
    )
    result = qcompiler.compile(tiny_decoder(), "ort-cpu", options, data=decoder_feeds(), progress=False)
    mp = result.report.mixed_precision
    assert mp["achieved_effective_bits"] <= 6.0 and mp["size_ratio"] > 0.9
    assert set(mp["groups_by_rung"]) <= {"int4-g32", "int4-g64", "int4-g128", "int8"}
    assert mp["final_mb"] == mp["achieved_mb"]  # the built model holds what the program chose
    how = {name: entry["how"].split(";")[0] for name, entry in result.report.compression["layers"].items()}
    for group, fmt in mp["formats"].items():
        if fmt.startswith("int4-g") and group in how:
            size = int(fmt.split("-g")[1])
            assert how[group] in (f"int4 sym group {size}", "int4 sym per-channel")  # K <= size


# Metrics ---------------------------------------------------------------------------------------


def test_user_metric_loader_errors_name_the_flag(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(
        "import numpy as np\nNOT_CALLABLE = 3\n"
        "def mean_output(outputs, feeds):\n    return float(np.mean([o.mean() for o in outputs]))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_metric("my_metrics:mean_output").higher_is_better
    for spec, message in [
        ("nonsense", "--metric 'nonsense': unknown metric"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("my_metrics:missing", "has no attribute 'missing'"),
        ("my_metrics:NOT_CALLABLE", "is not callable"),
    ]:
        with pytest.raises(OptionError, match=message):
            resolve_metric(spec)
    sys.modules.pop("my_metrics", None)


def test_drop_directions_and_relative_drops():
    model = mlp_with_attention_matmul()
    feeds = random_feeds(model, batches=2)
    evaluator = Evaluator(
        model, feeds, resolve_metric("cosine"), target_runners(backend_named("onnxruntime"))
    )
    assert evaluator.float_score == pytest.approx(1.0)
    assert evaluator.drop(0.98) == pytest.approx(0.02)
    perplexity = Evaluator.__new__(Evaluator)
    perplexity.metric, perplexity.drop_type, perplexity.float_score = (
        resolve_metric("perplexity"),
        DropType.RELATIVE,
        20.0,
    )
    assert perplexity.drop(21.0) == pytest.approx(0.05)  # lower is better


# End to end ------------------------------------------------------------------------------------


def _harmful_options(**accuracy):
    return CompileOptions(
        preset=Preset.DEFAULT,
        op_types=("MatMul", "Add"),
        count_fusion=False,
        accuracy=qcompiler.AccuracyOptions(metric="cosine", metric_output="scores", **accuracy),
    )


def _outlier_model(relu: bool = False) -> ir.Model:
    """x -> MatMul -> Add(a huge constant channel) -> [Relu] -> MatMul: the last MatMul's per-tensor
    input quantizer spends its range on the outlier channel."""
    rng = np.random.default_rng(3)
    x = float_input("x", ["batch", 8])
    graph = ir.Graph([x], [], nodes=[], name="outliers")
    h = add(graph, "MatMul", [x, const(graph, "w1", rng.standard_normal((8, 8)).astype(np.float32))], "fc1")
    big = np.zeros(8, np.float32)
    big[0] = 1000.0
    r = add(graph, "Add", [h, const(graph, "shift", big)], "shift_add")
    if relu:
        r = add(graph, "Relu", [r], "relu")
    w2 = rng.standard_normal((8, 4)).astype(np.float32)
    w2[0] = 0.0  # the outlier channel does not reach the output: only the others' noise shows
    y = add(graph, "MatMul", [r, const(graph, "w2", w2)], "fc2")
    y.name = "scores"
    graph.outputs.append(y)
    return model_of(graph)


def test_max_drop_moves_only_the_harmful_group():
    model = _outlier_model()
    feeds = random_feeds(model, batches=4, batch=16)
    options = _harmful_options(max_drop=0.001)
    result = qcompiler.compile(model, "ort-cpu", options, data=feeds, validation=feeds, progress=False)
    fallback = result.report.fallback
    assert fallback["met"] and fallback["drop"] <= 0.001
    moved = {name: g["format"] for name, g in fallback["groups"].items() if g["format"] != g["ladder"][0]}
    assert moved["fc2"] == "w8" and "shift_add" not in moved  # fc2: activations float, weights INT8
    for name in moved:  # each kept step was measured by stepping it back up
        assert fallback["groups"][name]["drop_contribution"] > 0.001
    tags = {n.op_type: n.metadata_props.get("qcompiler.fallback", "") for n in result.model.graph}
    assert tags["MatMulNBits"].startswith("group fc2: w8 ")  # weight-only INT8, float activations


def test_max_drop_needs_validation_data():
    model = mlp_with_attention_matmul()
    with pytest.raises(OptionError, match="--val-data"):
        qcompiler.compile(
            model, "ort-cpu", _harmful_options(max_drop=0.01), data=random_feeds(model), progress=False
        )


def test_unreachable_budget_saves_the_best_model_under_a_clear_name(tmp_path, capsys):
    model = _outlier_model()
    path = tmp_path / "m.onnx"
    qcompiler.save(model, path)
    feeds = random_feeds(model, batches=2, batch=16)
    for folder in ("cal", "val"):
        (tmp_path / folder).mkdir()
        for i, feed in enumerate(feeds):
            np.savez(tmp_path / folder / f"{i}.npz", **feed)
    code = main(
        [
            str(path),
            "--target",
            "ort-cpu",
            "--data",
            str(tmp_path / "cal"),
            "--val-data",
            str(tmp_path / "val"),
        ]
        + ["--max-drop", "0", "--max-trials", "1", "--metric", "cosine", "--metric-output", "scores", "-q"]
    )
    assert code == EXIT_BUDGET_NOT_MET
    err = capsys.readouterr().err
    assert "--max-drop 0" in err and "drop-not-met" in err
    assert (tmp_path / "m.ort-cpu.drop-not-met.onnx").exists()
    assert not (tmp_path / "m.ort-cpu.onnx").exists()


def test_search_stops_at_the_time_budget():
    evaluate, _ = _additive(HARMS)
    groups = _groups(HARMS)

    def slow(decision):
        import time

        time.sleep(0.02)
        return evaluate(decision)

    result = search(groups, rank(groups), slow, lambda s: 1.0 - s, 0.0, time_budget=0.01)
    assert not result.met and result.stopped_by == "time budget (0.01 s)"


def test_retrieval_metric_ranks_each_embedding_against_the_float_ones():
    metric = resolve_metric("retrieval")
    reference = [np.eye(4, dtype=np.float32)]
    assert metric.score(reference, reference, []) == pytest.approx(1.0)
    swapped = [np.eye(4, dtype=np.float32)[[1, 0, 2, 3]]]  # rows 0 and 1 find each other's: rank 2
    assert metric.score(swapped, reference, []) == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)


def test_perplexity_is_streamed_and_keeps_no_logits():
    """A perplexity evaluator keeps no float logits (805 MB for SmolLM2's 8 windows) and scores
    the same as the metric over all outputs at once."""
    from qcompiler.evaluation import _perplexity, model_outputs

    rng = np.random.default_rng(0)
    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", 12]))
    graph = ir.Graph([ids], [], nodes=[], name="lm")
    hidden = add(
        graph,
        "Gather",
        [const(graph, "table", rng.standard_normal((40, 8)).astype(np.float32)), ids],
        "embed",
    )
    logits = add(
        graph,
        "MatMul",
        [hidden, const(graph, "head", rng.standard_normal((8, 40)).astype(np.float32))],
        "head",
    )
    logits.name = "logits"
    graph.outputs.append(logits)
    model = model_of(graph)
    feeds = [{"input_ids": rng.integers(0, 40, (2, 12))} for _ in range(3)]
    runners = target_runners(backend_named("onnxruntime"))
    evaluator = Evaluator(model, feeds, resolve_metric("perplexity"), runners)
    assert evaluator.reference == []
    logits = [batch["logits"] for batch in model_outputs(model, feeds, ["logits"], runners)]
    assert evaluator.float_score == pytest.approx(_perplexity(logits, logits, feeds), rel=1e-9)
    assert evaluator.subset_float_score(1) == pytest.approx(
        _perplexity(logits[:1], logits[:1], feeds[:1]), rel=1e-9
    )
    assert evaluator.score(model, batches=2) == pytest.approx(
        _perplexity(logits[:2], logits[:2], feeds[:2]), rel=1e-9
    )


def _tiny_lm(seed: int, head_noise: float = 0.0) -> ir.Model:
    """input_ids -> Gather -> MatMul -> logits, with `head_noise` added to the head (a worse candidate)."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((40, 8)).astype(np.float32)
    head = rng.standard_normal((8, 40)).astype(np.float32)
    head += head_noise * np.random.default_rng(seed).standard_normal(head.shape).astype(np.float32)
    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", 16]))
    graph = ir.Graph([ids], [], nodes=[], name="lm")
    hidden = add(graph, "Gather", [const(graph, "table", table), ids], "embed")
    logits = add(graph, "MatMul", [hidden, const(graph, "head", head)], "head")
    logits.name = "logits"
    graph.outputs.append(logits)
    return model_of(graph)


def test_drop_interval_is_a_paired_bootstrap_over_windows():
    """The float model against itself: interval [0, 0]. A worse head: the interval holds the measured
    drop, and four times the windows narrow it by about half (sqrt(4))."""
    runners = target_runners(backend_named("onnxruntime"))
    rng = np.random.default_rng(1)
    windows = [{"input_ids": rng.integers(0, 40, (1, 16))} for _ in range(64)]
    model, worse = _tiny_lm(0), _tiny_lm(1, head_noise=0.3)
    widths = []
    for count in (16, 64):
        evaluator = Evaluator(
            model, windows[:count], resolve_metric("perplexity"), runners, DropType.RELATIVE
        )
        assert evaluator.uncertainty(model)["interval"] == [0.0, 0.0]
        measured = evaluator.uncertainty(worse)
        low, high = measured["interval"]
        assert measured["drop"] == pytest.approx(evaluator.drop(evaluator.score(worse)), rel=1e-9)
        assert low < measured["drop"] < high and measured["confidence"] == 0.95
        assert evaluator.uncertainty(worse) == measured  # seeded
        widths.append(high - low)
    assert 0.3 < widths[1] / widths[0] < 0.8


def test_drop_interval_for_a_per_sample_metric():
    """Cosine: batches of samples resampled, the float outputs kept from the float run."""
    model = _outlier_model()
    feeds = random_feeds(model, batches=8, batch=4)
    runners = target_runners(backend_named("onnxruntime"))
    evaluator = Evaluator(model, feeds, resolve_metric("cosine"), runners)
    noisy = _outlier_model()
    w2 = noisy.graph.initializers["w2"]
    w2.const_value = ir.tensor(w2.const_value.numpy() * 1.5 + 0.2, name="w2")
    measured = evaluator.uncertainty(noisy)
    low, high = measured["interval"]
    assert 0 < low <= measured["drop"] <= high
    assert evaluator.describe() == {"batches": 8, "samples": 32}


def test_max_drop_reports_its_data_and_interval(tmp_path, capsys):
    """The report and the summary say what the drop was measured on and how sure it is."""
    model = io.save(_outlier_model(), tmp_path / "outliers.onnx")
    folder = tmp_path / "data"
    folder.mkdir()
    for index, feed in enumerate(random_feeds(_outlier_model(), batches=4, batch=16)):
        np.savez(folder / f"{index}.npz", **feed)
    arguments = [str(model), "--target", "ort-cpu", "--op-types", "MatMul", "Add", "--data", str(folder)]
    arguments += ["--val-data", str(folder), "--max-drop", "0.001", "--metric", "cosine", "--no-fusion-count"]
    assert main(arguments) == 0
    fallback = json.loads((tmp_path / "outliers.ort-cpu.report.json").read_text())["fallback"]
    assert fallback["validation"] == {"batches": 4, "samples": 64}
    low, high = fallback["drop_interval"]
    assert low <= fallback["drop"] <= high and fallback["interval_confidence"] == 0.95
    assert fallback["met_within_noise"] == (high > 0.001)
    out = capsys.readouterr().out
    assert re.search(
        r"\n  measured on +4 batches, 64 samples; drop [-\d.e]+ \.\. [-\d.e]+ \(95% bootstrap interval\)", out
    )


def test_drop_margin_holds_the_search_inside_the_budget():
    """--drop-margin M: the search stops at max_drop - M, and the report states M."""
    model = _outlier_model()
    feeds = random_feeds(model, batches=4, batch=16)
    drops = []
    for margin in (0.0, 0.0008):
        options = _harmful_options(max_drop=0.001, drop_margin=margin)
        result = qcompiler.compile(model, "ort-cpu", options, data=feeds, validation=feeds, progress=False)
        fallback = result.report.fallback
        assert fallback["met"] and fallback["drop"] <= 0.001 - margin and fallback["drop_margin"] == margin
        drops.append(fallback["drop"])
    assert drops[1] <= 0.0002 < drops[0]  # without the margin the search stops above 0.001 - 0.0008
    with pytest.raises(OptionError, match=r"--drop-margin must be in \[0, --max-drop\], got 0.002"):
        qcompiler.AccuracyOptions(max_drop=0.001, drop_margin=0.002)
