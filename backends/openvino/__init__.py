"""OpenVINO backend: lowering to `openvino.Model`, its checker per device, saving, running on CPU.

`BACKEND` (in `backend.py`) is what the registry hands the drivers. OpenVINO IR *reading* is a
core frontend (`qcompiler.frontends.openvino_ir`); building a dialect graph back is `dialect.py`.
"""
