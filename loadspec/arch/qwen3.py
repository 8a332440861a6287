"""Qwen 3: per-head q/k RMSNorm, no q/k/v biases."""
from . import Family

FAMILY = Family(name="qwen3", model_types=("qwen3",))
