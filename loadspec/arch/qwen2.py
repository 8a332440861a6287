"""Qwen 2 / 2.5: Llama layout with q/k/v biases."""
from . import Family

FAMILY = Family(name="qwen2", model_types=("qwen2",))
