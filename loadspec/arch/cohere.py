"""Cohere Command-R: LayerNorm without bias, parallel attention/MLP, logit scale, tied embeddings."""
from . import Family

FAMILY = Family(name="cohere", model_types=("cohere",), norm="layernorm")
