"""OpenVINO backend: running models in OpenVINO CPU (calibration today; lowering comes with issue 6)."""

from qcompiler.backends.openvino.runtime import OpenVINORunner, bf16_available

__all__ = ["OpenVINORunner", "bf16_available"]
