"""Frontends: readers of model formats other than ONNX into onnx_ir (dispatched by `qcompiler.io.load`)."""
