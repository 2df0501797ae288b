"""Spec-Bench-compatible benchmarking: questions, methods, measurement, metrics, reports and plots."""
