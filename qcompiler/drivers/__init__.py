"""Drivers: the compile pipeline's stages and the budget searches.

The one layer that knows core, rewrites and backends: it resolves the target's backend through
`qcompiler.registry` and hands its runners to whatever runs a model (calibration, evaluation,
proxies, sensitivity).
"""
