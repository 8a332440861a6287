"""Falcon: fused query_key_value projection, GELU MLP, LayerNorm."""
from . import Family

FAMILY = Family(name="falcon", model_types=("falcon",), attention_modules=("query_key_value", "dense"),
                mlp_modules=("dense_h_to_4h", "dense_4h_to_h"), norm="layernorm", activation="gelu",
                notes="its Linear layers are FalconLinear; transformers' bitsandbytes integration skips them (so its 4-bit "
                      "Falcon is really 16-bit) and cannot read a 4-bit Falcon artifact; loadspec quantizes them as asked "
                      "and loadspec.load reads it")
