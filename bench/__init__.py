"""privsock benchmarks (bench/run.py is the entry point): plan, fixtures,
roundtrip, startup, report; one job per module."""
