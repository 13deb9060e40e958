"""Benchmarks: `make bench` (python -m bench) runs them all; each module also runs alone with --help."""
