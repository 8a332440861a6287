"""loadspec: compile how an LLM is loaded for fine-tuning into a cached, pre-quantized artifact.

    model, tokenizer = loadspec.load("my-model")          # a name built earlier
    model, tokenizer = loadspec.load("specs/smollm2.toml")  # built once if missing
"""
from .api import build, load, plan_spec
from .errors import LoadspecError, SpecError, UsageError

__all__ = ["build", "load", "plan_spec", "LoadspecError", "SpecError", "UsageError"]
__version__ = "0.1.0"
