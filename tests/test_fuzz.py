"""Fuzzing the CLI with mutated models and data: a named error or a clean compile, never a traceback.

Each example mutates a small real-shaped model (a MatMul MLP, a Conv + Gemm CNN) or its data the
way files break in practice: truncated, bit-flipped, an external-data entry pointing wrong, a
tensor renamed or deleted, a dtype or a dimension changed, a batch of the wrong shape, dtype or
content. The CLI must then exit 2 with one ``qcompile: error:`` line, leave the input files as
they were and write nothing; a mutation that leaves a valid model may compile (exit 0). Exit 1
(an internal error) is always a failure.

Hypothesis draws the mutations, derandomized so CI runs the same examples every time;
``QCOMPILER_FUZZ_EXAMPLES=500`` runs that many random ones per test instead (a longer local run).
"""

import contextlib
import io as stdio
import os
import pathlib
import tempfile

import numpy as np
import onnx
import onnx_ir as ir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcompiler import io
from qcompiler.cli import main
from tests.graphs import gemm_conv_model, mlp_with_attention_matmul
from tests.test_reliability import digests

EXAMPLES = int(os.environ.get("QCOMPILER_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="QCOMPILER_FUZZ_EXAMPLES" not in os.environ,  # a longer local run explores new examples
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MODELS = {"mlp": mlp_with_attention_matmul, "cnn": gemm_conv_model}
JOBS = {
    "w8a8": ["--target", "ort-cpu"],
    "int4": ["--target", "ort-cpu", "--weights", "int4", "--group-size", "0", "--scale-estimation"],
    "openvino": ["--target", "openvino-cpu"],
}


def _batches(model: ir.Model, count: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        {
            str(v.name): rng.standard_normal([d if isinstance(d, int) else 2 for d in v.shape]).astype(
                np.float32
            )
            for v in model.graph.inputs
        }
        for _ in range(count)
    ]


def run_cli(folder: pathlib.Path, model: pathlib.Path, data: pathlib.Path, job: str) -> None:
    """The property: exit 0, or exit 2 with one named error line and the folder as it was."""
    before = digests(folder)
    err = stdio.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(model), *JOBS[job], "--data", str(data), "-q"])
    lines = err.getvalue().strip().splitlines()
    errors = [line for line in lines if line.startswith("qcompile: ")]
    assert code in (0, 2), f"exit {code}: {err.getvalue()[-800:]}"
    assert "Traceback" not in err.getvalue(), err.getvalue()[-800:]
    if code == 2:
        assert len(errors) == 1 and errors[0].startswith("qcompile: error: "), lines
        assert digests(folder) == before
    else:  # a mutation that left a valid model: compiled beside the untouched input
        after = digests(folder)
        assert {k: v for k, v in after.items() if k in before} == before


@contextlib.contextmanager
def workspace(kind: str, external: bool = False):
    """A folder with the model (external data if asked) and a folder of two .npz batches."""
    with tempfile.TemporaryDirectory(prefix="qcompile-fuzz-") as name:
        folder = pathlib.Path(name)
        model = MODELS[kind]()
        path = io.save(model, folder / "model.onnx", external_data=external)
        data = folder / "calib"
        data.mkdir()
        for index, batch in enumerate(_batches(model)):
            np.savez(data / f"{index}.npz", **batch)
        yield folder, path, data


@FUZZ
@given(
    kind=st.sampled_from(sorted(MODELS)),
    job=st.sampled_from(sorted(JOBS)),
    cut=st.floats(0.0, 0.999),
)
def test_truncated_model(kind, job, cut):
    """The model file cut short anywhere."""
    with workspace(kind) as (folder, path, data):
        content = path.read_bytes()
        path.write_bytes(content[: int(len(content) * cut)])
        run_cli(folder, path, data, job)


@FUZZ
@given(
    kind=st.sampled_from(sorted(MODELS)),
    job=st.sampled_from(sorted(JOBS)),
    flips=st.lists(st.tuples(st.floats(0.0, 0.999), st.integers(0, 7)), min_size=1, max_size=4),
)
def test_bit_flips(kind, job, flips):
    """A few bits flipped anywhere in the protobuf (headers, names, types, dims, weights)."""
    with workspace(kind) as (folder, path, data):
        content = bytearray(path.read_bytes())
        for where, bit in flips:
            content[int(len(content) * where)] ^= 1 << bit
        path.write_bytes(bytes(content))
        run_cli(folder, path, data, job)


def _edit_proto(path: pathlib.Path, edit) -> None:
    proto = onnx.load(path, load_external_data=False)
    edit(proto)
    onnx.save(proto, path)


EXTERNAL_EDITS = {
    "offset past the end": lambda entry: entry.update(offset="1000000"),
    "negative offset": lambda entry: entry.update(offset="-8"),
    "length too short": lambda entry: entry.update(length="4"),
    "length too long": lambda entry: entry.update(length="99999999"),
    "escaping location": lambda entry: entry.update(location="../../etc/passwd"),
    "absolute location": lambda entry: entry.update(location="/etc/passwd"),
    "missing file": lambda entry: entry.update(location="nowhere.data"),
    "not a number": lambda entry: entry.update(offset="twelve"),
}


@FUZZ
@given(
    kind=st.sampled_from(sorted(MODELS)),
    job=st.sampled_from(sorted(JOBS)),
    edit=st.sampled_from(sorted(EXTERNAL_EDITS)),
    which=st.integers(0, 100),
)
def test_bad_external_data_entries(kind, job, edit, which):
    """One external-data entry of one initializer edited to point wrong."""
    with workspace(kind, external=True) as (folder, path, data):

        def mutate(proto):
            external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
            tensor = external[which % len(external)]
            entry = {item.key: item.value for item in tensor.external_data}
            EXTERNAL_EDITS[edit](entry)
            del tensor.external_data[:]
            for key, value in entry.items():
                tensor.external_data.add(key=key, value=value)

        _edit_proto(path, mutate)
        run_cli(folder, path, data, job)


TYPES = [t for t in onnx.TensorProto.DataType.values() if t != onnx.TensorProto.FLOAT] + [999]


@FUZZ
@given(
    kind=st.sampled_from(sorted(MODELS)),
    job=st.sampled_from(sorted(JOBS)),
    what=st.sampled_from(
        [
            "rename initializer",
            "delete initializer",
            "rename node input",
            "rename node output",
            "initializer dtype",
            "input dtype",
            "initializer dims",
            "input dims",
            "drop opset",
            "duplicate node output",
        ]
    ),
    which=st.integers(0, 100),
    dtype=st.sampled_from(TYPES),
    dim=st.sampled_from([0, -1, -7, 3, 2**31, 2**62]),
)
def test_graph_mutations(kind, job, what, which, dtype, dim):
    """Tensors renamed or deleted, dtypes and dims changed, opsets dropped, outputs duplicated."""
    with workspace(kind) as (folder, path, data):

        def mutate(proto):
            graph = proto.graph
            initializer = graph.initializer[which % len(graph.initializer)]
            node = graph.node[which % len(graph.node)]
            if what == "rename initializer":
                initializer.name = "renamed"
            elif what == "delete initializer":
                graph.initializer.remove(initializer)
            elif what == "rename node input":
                node.input[which % len(node.input)] = "ghost"
            elif what == "rename node output":
                node.output[0] = "ghost"
            elif what == "initializer dtype":
                initializer.data_type = dtype
            elif what == "input dtype":
                graph.input[0].type.tensor_type.elem_type = dtype
            elif what == "initializer dims":
                initializer.dims[which % len(initializer.dims)] = dim
            elif what == "input dims":
                dims = graph.input[0].type.tensor_type.shape.dim
                dims[which % len(dims)].dim_value = dim
            elif what == "drop opset":
                del proto.opset_import[:]
            elif what == "duplicate node output":
                graph.node[-1].output[0] = graph.node[0].output[0]

        _edit_proto(path, mutate)
        run_cli(folder, path, data, job)


@FUZZ
@given(
    kind=st.sampled_from(sorted(MODELS)),
    job=st.sampled_from(sorted(JOBS)),
    what=st.sampled_from(
        [
            "dtype",
            "rank",
            "size",
            "empty",
            "nonfinite",
            "extra key",
            "missing key",
            "garbage",
            "pickle",
            "none",
        ]
    ),
    value=st.sampled_from([np.nan, np.inf, -np.inf]),
    dtype=st.sampled_from(["int64", "int8", "bool", "complex64", "float64", "float16", "U3"]),
)
def test_data_mutations(kind, job, what, value, dtype):
    """One calibration batch of the wrong dtype, rank, size or content, or not an .npz at all."""
    with workspace(kind) as (folder, path, data):
        batch_file = data / "1.npz"
        batch = dict(np.load(batch_file))
        name = next(iter(batch))
        array = batch[name]
        if what == "dtype":
            batch[name] = np.zeros(array.shape, dtype=dtype)
        elif what == "rank":
            batch[name] = array[None]
        elif what == "size":
            batch[name] = np.concatenate([array, array], axis=-1)
        elif what == "empty":
            batch[name] = array[:0]
        elif what == "nonfinite":
            array.reshape(-1)[3] = value
        elif what == "extra key":
            batch["surprise"] = array
        elif what == "missing key":
            batch = {"other": array}
        if what == "garbage":
            batch_file.write_bytes(b"PK\x03\x04 not really a zip")
        elif what == "pickle":
            np.save(batch_file.with_suffix(".npy"), np.array([object()], dtype=object), allow_pickle=True)
            batch_file.with_suffix(".npy").rename(batch_file)
        elif what == "npy":
            np.save(batch_file.with_suffix(".npy"), array)
            batch_file.with_suffix(".npy").rename(batch_file)
        elif what != "none":
            np.savez(batch_file, **batch)
        run_cli(folder, path, data, job)
