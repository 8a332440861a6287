"""Gemma 2: Gemma plus logit soft-capping and sliding windows; float16 activations overflow."""
from . import Family

FAMILY = Family(name="gemma2", model_types=("gemma2",), norm="rmsnorm_plus_one", activation="geglu", fp16_overflows=True,
                notes="activations exceed float16's range; float32 is used where bfloat16 is unavailable")
