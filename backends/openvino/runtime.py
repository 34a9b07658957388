"""Running an in-memory ONNX model in OpenVINO CPU (the one place that imports openvino here).

Calibration runs a model over many batches; on CPUs with AMX / AVX512-BF16, OpenVINO's bf16
inference is 3-4x faster than onnxruntime's fp32 for transformer blocks (SmolLM2-135M, 512
tokens: 0.20 s vs 0.81 s per window here), and its f32 mode is still faster. Statistics of
weight compression (Gram matrices) tolerate bf16's 8-bit mantissa; activation ranges for static
quantization keep onnxruntime's fp32 by default.
"""

from __future__ import annotations

import collections
import concurrent.futures
import pathlib
import queue
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qcompiler.backends.openvino.dialect import to_openvino_model
from qcompiler.frontends.openvino_ir import is_openvino_dialect
from qcompiler.io import save


def bf16_available() -> bool:
    """Whether OpenVINO's CPU plugin can run bf16 inference on this machine."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVINORunner:
    """Compiles a model for OpenVINO CPU and runs feeds (a `qcompiler.backend.Runner`).

    `model` is an `openvino.Model` (a lowered artifact) or an ONNX model, read by OpenVINO's ONNX
    frontend through a temporary file (float models for calibration). `precision` is "f32" or
    "bf16" (the CPU plugin's inference precision hint).
    """

    def __init__(
        self, model: object, *, precision: str = "f32", threads: int | None = None, streams: int = 1
    ) -> None:
        import openvino as ov

        core = ov.Core()
        config: dict[str, object] = {"INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if streams > 1:
            config["NUM_STREAMS"] = streams
        if isinstance(model, ir.Model) and is_openvino_dialect(model):  # read from OpenVINO IR
            self._compiled = core.compile_model(to_openvino_model(model), "CPU", config)
        elif isinstance(model, ir.Model):
            with tempfile.TemporaryDirectory(prefix="qcompile-openvino-") as folder:
                path = save(model, pathlib.Path(folder) / "model.onnx", external_data=True)
                self._compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        else:
            self._compiled = core.compile_model(model, "CPU", config)
        self._requests = [self._compiled.create_infer_request() for _ in range(max(streams, 1))]
        # OpenVINO's pybind11 initialises its numpy API lazily under std::call_once; first used by
        # two stream threads at once it deadlocked (both waiting in gil_safe_call_once_and_store,
        # the main thread waiting for the GIL: seen in CI). Touch it here, on this thread, first.
        _ = ov.Tensor(np.zeros(1, np.float32)).data
        self._request = self._requests[0]
        self._outputs = {name: output for output in self._compiled.outputs for name in output.get_names()}
        self.output_names = [output.get_any_name() for output in self._compiled.outputs]
        self.precision = precision

    def run(self, names: Sequence[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The named outputs for one feed (float32 whatever the inference precision)."""
        return self._run_on(self._request, names, feed)

    def _run_on(self, request, names: Sequence[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        results = request.infer({name: _to_openvino(array) for name, array in feed.items()})
        return [_from_openvino(results[self._outputs[name]], self._outputs[name]) for name in names]

    def run_all(
        self, names: Sequence[str], feeds: Iterable[Mapping[str, np.ndarray]]
    ) -> Iterator[list[np.ndarray]]:
        """The named outputs of each feed, in order; with several streams, feeds run concurrently.

        Small batches (one sentence) leave a core idle inside one inference; one request per
        stream on its own thread keeps both busy (MiniLM, 300 one-sentence feeds: 1.8 -> 1.3 s).
        At most two feeds per stream are in flight, so results never pile up.
        """
        if len(self._requests) == 1:
            for feed in feeds:
                yield self.run(names, feed)
            return
        idle: queue.Queue = queue.Queue()
        for request in self._requests:
            idle.put(request)

        def infer(feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
            request = idle.get()
            try:
                return self._run_on(request, names, feed)
            finally:
                idle.put(request)

        pending: collections.deque = collections.deque()
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(self._requests)) as pool:
            for feed in feeds:
                pending.append(pool.submit(infer, feed))
                if len(pending) >= 2 * len(self._requests):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()


def _to_openvino(array: np.ndarray):  # -> np.ndarray | openvino.Tensor
    """A feed array as OpenVINO reads it: a bf16 tensor for ml_dtypes' bfloat16.

    OpenVINO's Python API would otherwise read a bfloat16 array's bits as float16.
    """
    if array.dtype != ml_dtypes.bfloat16:
        return array
    import openvino as ov

    tensor = ov.Tensor(ov.Type.bf16, ov.Shape(list(array.shape)))
    tensor.data.view(np.uint16)[...] = np.ascontiguousarray(array).view(np.uint16)
    return tensor


def _from_openvino(result: np.ndarray, output) -> np.ndarray:
    """An output as numpy: bf16 results (returned as float16 bits) as ml_dtypes' bfloat16."""
    import openvino as ov

    if output.get_element_type() == ov.Type.bf16:
        return np.asarray(result).view(np.uint16).view(ml_dtypes.bfloat16)
    return np.asarray(result)
