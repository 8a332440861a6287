"""Falcon: fused query_key_value projection, GELU MLP, LayerNorm."""
from . import Family

FAMILY = Family(name="falcon", model_types=("falcon",), attention_modules=("query_key_value", "dense"),
                mlp_modules=("dense_h_to_4h", "dense_4h_to_h"), norm="layernorm", activation="gelu")
