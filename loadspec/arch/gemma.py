"""Gemma: RMSNorm scales by (1 + weight), GeGLU MLP, tied embeddings."""
from . import Family

FAMILY = Family(name="gemma", model_types=("gemma",), norm="rmsnorm_plus_one", activation="geglu")
