"""Evaluation: likelihood and sample metrics, the eval and sample modes, infilling, reference
models."""
