"""Benchmarks of fgo_geoopt, run as scripts from the repository root (not installed).

``step.py`` is the optimizer-step benchmark's command line; the ``_bench_*`` modules hold its
pieces, imported as ``benchmarks._bench_*`` (``step.py`` puts the repository root on the path
when it runs as a script or is loaded from its file).
"""
