"""Interrupts, full disks and repeated compiles: nothing half-written, nothing left behind, the same bytes twice."""

import contextlib
import errno
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile

import numpy as np
import onnx_ir as ir
import pytest

from qcompiler import io
from qcompiler.cli import main
from qcompiler.report import Report
from tests.graphs import mlp_with_attention_matmul
from tests.test_reliability import INT4, W8A8, calibration, digests

STAGES_W8A8 = [
    "validate_model",
    "normalize",
    "smooth_quant",
    "calibrate",
    "quantize",
    "lower",
    "count_fusion",
]
STAGES_INT4 = ["validate_model", "normalize", "calibrate", "compress", "lower"]


@pytest.fixture()
def workspace(tmp_path, monkeypatch):
    """A model, its data and an empty temporary folder every temporary file of the compile must go to."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    folder = tmp_path / "work"
    folder.mkdir()
    model = io.save(mlp_with_attention_matmul(), folder / "mlp.onnx")
    return folder, model, calibration(folder), scratch


def _interrupt_at(monkeypatch, stage: str, how: str) -> None:
    """Make entering `stage` deliver `how` (KeyboardInterrupt, or a real SIGTERM to this process)."""
    original = Report.timed

    @contextlib.contextmanager
    def timed(self, name):
        if name == stage:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise KeyboardInterrupt
        with original(self, name):
            yield

    monkeypatch.setattr(Report, "timed", timed)


@pytest.mark.parametrize("how, code", [("sigint", 130), ("sigterm", 143)])
@pytest.mark.parametrize(
    "job, stage",
    [(W8A8, stage) for stage in STAGES_W8A8] + [(INT4 + ["--awq", "--gptq"], stage) for stage in STAGES_INT4],
)
def test_interrupt_at_any_stage_leaves_nothing(workspace, monkeypatch, capsys, job, stage, how, code):
    """SIGINT / SIGTERM at each stage: exit 130 / 143, no output, no temporary file, input untouched."""
    folder, model, data, scratch = workspace
    before = digests(folder)
    _interrupt_at(monkeypatch, stage, how)
    assert main([str(model), *job, "--data", str(data), "-q"]) == code
    assert "nothing was written" in capsys.readouterr().err
    assert digests(folder) == before
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("how, code", [("sigint", 130), ("sigterm", 143)])
def test_interrupt_while_saving_removes_the_partial_files(workspace, monkeypatch, how, code):
    """An interrupt inside the model's write (external data half written) leaves no staging folder or companion."""
    folder, model, data, scratch = workspace
    before = digests(folder)
    original = ir.save

    def interrupted_save(model, path, **options):
        original(model, path, **options)  # the staged files are complete ...
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt  # ... and are never renamed into place

    monkeypatch.setattr(ir, "save", interrupted_save)
    assert main([str(model), *W8A8, "--data", str(data), "--external-data", "-q"]) == code
    assert digests(folder) == before and not list(folder.glob(".qcompile-*"))
    assert list(scratch.iterdir()) == []


def test_interrupt_while_writing_the_report_removes_the_model(workspace, monkeypatch):
    """Model and report are one output: no model without its report."""
    folder, model, data, _ = workspace
    before = digests(folder)

    def interrupted(path, text):
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "atomic_write_text", interrupted)
    assert main([str(model), *W8A8, "--data", str(data), "--external-data", "-q"]) == 130
    assert digests(folder) == before


@pytest.mark.parametrize("how, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_real_signal_to_a_running_compile(tmp_path, how, code):
    """The installed CLI in its own process, signalled from outside while it calibrates."""
    folder = tmp_path / "work"
    folder.mkdir()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    model = io.save(mlp_with_attention_matmul(), folder / "mlp.onnx")
    data = folder / "calib"
    data.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4000):  # ~2 s a calibration pass: the signal lands mid-compile even on a loaded machine
        np.savez(data / f"{index:04d}.npz", x=rng.standard_normal((2, 6, 8)).astype(np.float32))
    before = digests(folder)
    process = subprocess.Popen(
        [sys.executable, "-m", "qcompiler.cli", str(model), *W8A8, "--data", str(data), "--range", "search"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(scratch)},
        # a shell runs background jobs with SIGINT ignored, and a child inherits that (Python then
        # installs no KeyboardInterrupt): the compile gets the disposition an interactive one has
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert process.stderr is not None
    seen = b""
    while b"calibrating" not in seen:  # the first calibration pass is under way
        chunk = process.stderr.read1(4096)
        assert chunk, f"the compile ended before it was signalled: {seen.decode()[-500:]}"
        seen += chunk
    process.send_signal(how)
    rest = process.communicate(timeout=120)[1].decode()
    assert process.returncode == code, rest[-500:]
    assert "nothing was written" in rest and "Traceback" not in rest, rest[-800:]
    assert digests(folder) == before
    # onnxruntime's import writes $TMPDIR/.ses (a session id, one fixed name): not a compile's file
    assert [p.name for p in scratch.iterdir() if p.name != ".ses"] == [], rest[-800:]


@contextlib.contextmanager
def small_filesystem(tmp_path: pathlib.Path):
    """A folder on a nearly full file system: a real tmpfs where mounting is allowed, else None."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, check=False
        ).returncode
        == 0
    )
    try:
        yield mount if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], check=False)


def fill(folder: pathlib.Path, leave: int) -> None:
    """Write a filler file until at most `leave` bytes are free on `folder`'s file system."""
    with open(folder / "filler", "wb") as stream:
        with contextlib.suppress(OSError):
            while True:
                free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
                if free <= leave:
                    break
                stream.write(b"\0" * min(65536, free - leave))
                stream.flush()


def test_full_disk_is_a_named_error_that_leaves_nothing(tmp_path, capsys, monkeypatch):
    """No space for the artifact: exit 2, 'no space left', the partial files removed.

    On a real 1 MB tmpfs where this machine may mount one; elsewhere the write fails with ENOSPC
    half-way through (the same error, raised by a stand-in).
    """
    with small_filesystem(tmp_path) as disk:
        folder = disk or tmp_path / "work"
        folder.mkdir(exist_ok=True)
        model = io.save(mlp_with_attention_matmul(), folder / "mlp.onnx")
        data = calibration(folder)
        if disk is not None:
            fill(folder, leave=512)
        else:
            original = ir.save

            def disk_full(model, path, **options):
                original(model, path, **options)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

            monkeypatch.setattr(ir, "save", disk_full)
        before = digests(folder)
        assert main([str(model), *W8A8, "--data", str(data), "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert "mlp.ort-cpu.onnx: could not serialize the model: no space left on the device of" in err, err
        assert digests(folder) == before and not list(folder.glob(".qcompile-*"))


def test_full_disk_for_the_report_removes_the_model(tmp_path, capsys, monkeypatch):
    """The model fits, its report does not (a real ENOSPC from /dev/full): neither is left."""
    folder = tmp_path / "work"
    folder.mkdir()
    model = io.save(mlp_with_attention_matmul(), folder / "mlp.onnx")
    data = calibration(folder)
    before = digests(folder)
    original = tempfile.mkstemp

    def full_device(*args, **kwargs):
        handle, path = original(*args, **kwargs)
        os.close(handle)
        return os.open("/dev/full", os.O_WRONLY), path

    monkeypatch.setattr(io.tempfile, "mkstemp", full_device)
    assert main([str(model), *W8A8, "--data", str(data), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(
        r"mlp.ort-cpu.report.json: no space left on the device of .* \(\d+\.\d MB free\)", err
    ), err
    assert digests(folder) == before and not list(folder.glob(".qcompile-*"))


@pytest.mark.parametrize(
    "job",
    [W8A8, W8A8 + ["--range", "search"], INT4 + ["--awq", "--scale-estimation", "--gptq"]],
    ids=["w8a8", "w8a8-search", "int4-awq-se-gptq"],
)
def test_identical_compiles_give_identical_bytes(tmp_path, job):
    """Artifact bytes equal; reports equal outside their ``run`` section (times, memory, versions)."""
    model = io.save(mlp_with_attention_matmul(), tmp_path / "mlp.onnx")
    data = calibration(tmp_path)
    outputs = []
    for _ in range(2):
        assert main([str(model), *job, "--data", str(data), "-q"]) == 0
        report = json.loads((tmp_path / "mlp.ort-cpu.report.json").read_text())
        assert set(report["run"]) >= {"note", "timings_s", "peak_rss_mb", "versions"}
        report.pop("run")
        outputs.append(((tmp_path / "mlp.ort-cpu.onnx").read_bytes(), report))
    assert outputs[0][0] == outputs[1][0]
    assert outputs[0][1] == outputs[1][1]
