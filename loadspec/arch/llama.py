"""Llama 2/3 (and SmolLM, TinyLlama, …): the reference decoder."""
from . import Family

FAMILY = Family(name="llama", model_types=("llama",))
