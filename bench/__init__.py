"""Benchmarks: each prints a table and JSON and compares against a reference measured in the same run."""
