"""Large random-weight Llama-shaped checkpoints written tensor by tensor (never the whole model in RAM).

    python tools/synthetic.py OUT --shape 8b
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig

from loadspec import arch
from loadspec.bench import SHAPES, _letter_tokenizer
from loadspec.shards import ShardWriter


def parameter_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every stored parameter, from the config alone (meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), arch.skip_weight_init():
        model = AutoModelForCausalLM.from_config(arch.hf_config(config))
    model.tie_weights()
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def write_checkpoint(out: Path, shape: str, *, seed: int = 0, max_shard_bytes: int = 4 * 1024**3) -> Path:
    """config.json, sharded bf16 safetensors and a tokenizer for a Llama of `shape` (see loadspec.bench.SHAPES)."""
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(max_position_embeddings=8192, rope_theta=500000.0, **SHAPES[shape]).to_dict()
    config.update(model_type="llama", architectures=["LlamaForCausalLM"], dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shapes = parameter_shapes(config)
    generator = torch.Generator().manual_seed(seed)
    writer = ShardWriter(out, list(shapes), max_shard_bytes=max_shard_bytes)
    for name, dims in shapes.items():
        values = torch.empty(dims, dtype=torch.bfloat16)
        values.copy_(torch.randn(dims, generator=generator, dtype=torch.float32).mul_(0.02) if math.prod(dims) < 2**26
                     else torch.randn(dims, generator=generator, dtype=torch.bfloat16).mul_(0.02))
        writer.add(name, values)
        del values
    writer.close()
    _letter_tokenizer().save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    args = parser.parse_args()
    write_checkpoint(args.out, args.shape)
    sys.exit(0)
