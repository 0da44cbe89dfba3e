"""Measurements: parameter counts, FLOPs, latency, peak memory, accuracy, plots."""

from .counts import count_flops, count_parameters
from .evaluate import EvalResult, evaluate_model
from .timing import latency

__all__ = ["EvalResult", "count_flops", "count_parameters", "evaluate_model", "latency"]
