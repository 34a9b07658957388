"""What the benchmark scripts share: calibration feeds on disk, the tools' compile calls, tables.

Each benchmark compiles every tool in its own subprocess (so wall time and peak RSS are the tool's
own) from the same calibration feeds, saved here as numbered ``.npz`` files.
"""

from __future__ import annotations

import pathlib

import numpy as np


def artifact_mb(path: pathlib.Path) -> float:
    """Size of a model with its weights file (OpenVINO ``.bin``, ONNX external ``.data``), MiB."""
    companions = [
        path,
        path.with_suffix(".bin") if path.suffix == ".xml" else path.with_name(path.name + ".data"),
    ]
    return round(sum(file.stat().st_size for file in companions if file.exists()) / 2**20, 1)


def save_feeds(feeds, folder: pathlib.Path) -> None:
    """Write feeds as 0.npz, 1.npz, ... (read back in order by `load_feeds`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, feed in enumerate(feeds):
        np.savez(folder / f"{index}.npz", **feed)


def load_feeds(folder: pathlib.Path) -> list[dict[str, np.ndarray]]:
    """The feeds `save_feeds` wrote, in order."""
    feeds = []
    for file in sorted(folder.glob("*.npz"), key=lambda p: int(p.stem)):
        with np.load(file, allow_pickle=False) as archive:
            feeds.append({key: archive[key] for key in archive.files})
    return feeds


def qcompiler_w8a8(
    model: pathlib.Path, feeds, output: pathlib.Path, *, smooth_quant: bool, target: str = "ort-cpu"
) -> None:
    """qcompiler's transformer preset, SmoothQuant on or off (an .xml output for openvino-* targets)."""
    import qcompiler

    options = qcompiler.CompileOptions(
        preset=qcompiler.Preset.TRANSFORMER,
        count_fusion=False,
        smooth_quant=qcompiler.SmoothQuantOptions(enabled=smooth_quant),
    )
    save_result(qcompiler.compile(model, target, options, data=feeds, progress=False), output)


def ort_quantize_static(model: pathlib.Path, feeds, output: pathlib.Path, **options) -> None:
    """onnxruntime's quantize_static in QDQ format over `feeds`; `options` are its keyword arguments."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.iterator = iter(feeds)

        def get_next(self):
            return next(self.iterator, None)

    quantize_static(str(model), str(output), Reader(), quant_format=QuantFormat.QDQ, **options)


def report_compile(compile_once) -> None:
    """Child process side: run `compile_once()`, then print its wall time and this process's peak RSS as JSON."""
    import json
    import time

    try:
        from qcompiler.report import peak_rss_mb
    except ImportError:  # a peer's own virtual environment (ModelOpt's) has no qcompiler

        def peak_rss_mb() -> float:
            status = pathlib.Path("/proc/self/status").read_text()
            return (
                int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024
            )

    start = time.perf_counter()
    compile_once()
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()  # VmHWM: ru_maxrss would include the parent's memory (kept across exec)
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mb": round(peak, 1)}))


def save_result(result, output: pathlib.Path) -> None:
    """Write a compile result: its OpenVINO artifact as .xml, else the ONNX model."""
    result.save(output)


def nncf_openvino(model: pathlib.Path, feeds, output: pathlib.Path, *, transformer: bool = True) -> None:
    """NNCF quantize on the OpenVINO backend: TRANSFORMER model type (SmoothQuant on), else its defaults."""
    import nncf
    import openvino as ov

    quantized = nncf.quantize(
        ov.convert_model(str(model)),
        nncf.Dataset(feeds),
        model_type=nncf.ModelType.TRANSFORMER if transformer else None,
        subset_size=len(feeds),
    )
    ov.save_model(quantized, str(output), compress_to_fp16=False)


def replace_section(path: pathlib.Path, heading: str, section: str) -> None:
    """Replace the ``## heading`` section of a Markdown file (or append it)."""
    text = (
        path.read_text()
        if path.exists()
        else "# Benchmarks\n\nAbsolute timings are noisy here: compare ratios within one run.\n\n"
    )
    start = text.find(f"## {heading}")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1 :] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


def write_table_section(heading: str, intro: str, table: list[str], rows: dict[str, dict]) -> None:
    """Replace ``## heading`` in docs/benchmarks.md: the intro, the table lines, each row's description."""
    legend = "\n".join(f"- `{name}`: {row['description']}" for name, row in rows.items())
    section = f"## {heading}\n\n{intro}\n\n" + "\n".join(table) + f"\n\n{legend}\n"
    replace_section(pathlib.Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md", heading, section)


def version_of(name: str) -> str:
    """Installed version of a distribution, or "not installed"."""
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def parse_or_work(parser, worker):
    """Parse the command line; in a child started by `compile_in_child`, run `worker(args)` and return None."""
    add_worker_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return None
    return args


def compile_in_child(
    script: str,
    tool: str,
    model: pathlib.Path,
    calibration: pathlib.Path,
    output: pathlib.Path,
    python: str | None = None,
    **run,
) -> dict:
    """Compile with `tool` in a child process of `script`: the JSON line its worker prints (wall time,
    peak RSS, ...), or ``{"error": the last line of its stderr}``. `python`: another interpreter (a
    peer's own virtual environment); `run`: extra `subprocess.run` arguments (``cwd``)."""
    import json
    import subprocess
    import sys

    command = [
        python or sys.executable,
        str(pathlib.Path(script).resolve()),
        "--worker",
        tool,
        "--model",
        str(model),
    ]
    command += ["--calibration", str(calibration), "--output", str(output)]
    process = subprocess.run(command, capture_output=True, text=True, check=False, **run)
    if process.returncode != 0:
        return {"error": (process.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(process.stdout.strip().splitlines()[-1])


def add_worker_arguments(parser) -> None:
    """The hidden flags a benchmark passes to itself to compile one tool in a child process."""
    import argparse

    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=pathlib.Path, help=argparse.SUPPRESS)
    parser.add_argument("--calibration", type=pathlib.Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=pathlib.Path, help=argparse.SUPPRESS)


class Runner:
    """Runs an artifact in its runtime: onnxruntime for .onnx, OpenVINO CPU (f32) for .xml; 2 threads."""

    def __init__(self, path: pathlib.Path, backend: str | None = None) -> None:
        """`backend`: the runtime by name (a BF16 .onnx runs in "openvino"); default: by suffix."""
        from qcompiler.backend import RunnerSettings
        from qcompiler.precision import as_float32
        from qcompiler.registry import backend_for_artifact, backend_named

        self.path = path
        chosen = backend_named(backend) if backend else backend_for_artifact(path)
        runner = chosen.runner(path, RunnerSettings(threads=2))
        names = list(runner.output_names)

        def run(feed, output: str) -> np.ndarray:
            # A single output is taken whatever an exporter named it.
            name = output if output in names or len(names) != 1 else names[0]
            return as_float32(runner.run([name], feed)[0])  # FP16 / BF16 artifacts measured in FP32

        self.run = run

    def outputs(self, feeds, output: str) -> np.ndarray:
        """One output over all feeds, concatenated along the batch."""
        return np.concatenate([self.run(feed, output) for feed in feeds])

    def perplexity(self, feeds, output: str = "logits") -> tuple[float, int]:
        """Next-token perplexity over token windows, and the number of tokens scored."""
        from qcompiler.metrics import next_token_nll

        total, count = 0.0, 0
        for feed in feeds:
            nll, tokens = next_token_nll(self.run(feed, output), feed["input_ids"])
            total, count = total + nll, count + tokens
        return float(np.exp(total / count)), count
