"""onnxruntime CPU backend: lowering rules, legality checker, fusion counting, sessions.

`BACKEND` (in `backend.py`) is what the registry hands the drivers.
"""
