"""Gemma 3 (text): q/k norms, local/global attention; float16 activations overflow."""
from . import Family

FAMILY = Family(name="gemma3", model_types=("gemma3_text",), norm="rmsnorm_plus_one", activation="geglu", fp16_overflows=True,
                notes="activations exceed float16's range; float32 is used where bfloat16 is unavailable")
