"""Mistral: Llama layout with sliding-window attention."""
from . import Family

FAMILY = Family(name="mistral", model_types=("mistral",))
