"""TensorRT backend: strongly typed explicit-quantization ONNX, its parser's rules, CPU verification.

`BACKEND` (in `backend.py`) is what the registry hands the drivers. TensorRT itself never runs
here (its builder needs a CUDA device): artifacts are checked against the parser's rules
(`legality`) and executed on onnxruntime's CPU provider (`verification`).
"""
