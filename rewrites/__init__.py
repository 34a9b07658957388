"""Rewrite passes: graph-to-graph transformations that do not depend on any runtime.

`rewrites` never imports `qcompiler.backends` (tests/test_layering.py enforces it).
"""
