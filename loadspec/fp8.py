"""fp8 weights: float8_e4m3fn Linear weights with float32 scales, and the Linear module that computes with them.

A scale is `absmax / 448` (448: the largest e4m3 value) of one output row (`scaling = "row"`) or of one 128x128
block (`"block"`, the last blocks of an odd shape are short); codes are `clamp(w / scale)` rounded to e4m3, and
`codes * scale` gives the weight back. A row or block of zeros (or too small for a float32 scale) gets scale 1.
The stored names are transformers' layouts: `weight_scale` [out, 1] (its fbgemm_fp8 row-wise format) or
`weight_scale_inv` [ceil(out/128), ceil(in/128)] (its fine-grained FP8, DeepSeek's format).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128
SCALINGS = ("row", "block")
MIN_CAPABILITY = (8, 9)  # Ada / Hopper: fp8 tensor cores


def scale_name(scaling: str) -> str:
    """The attribute (and safetensors suffix) holding a module's scales."""
    return "weight_scale" if scaling == "row" else "weight_scale_inv"


def scale_shape(rows: int, cols: int, scaling: str) -> tuple[int, int]:
    return (rows, 1) if scaling == "row" else (-(-rows // BLOCK), -(-cols // BLOCK))


def stored_bytes(shape: tuple[int, ...], scaling: str) -> int:
    """Bytes of one stored weight: 1 per value plus its float32 scales."""
    return math.prod(shape) + 4 * math.prod(scale_shape(shape[0], shape[1], scaling))


def quantize(weight: torch.Tensor, scaling: str = "row", *, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn codes, float32 scales) of a 2-D weight; inf/NaN is refused, naming the tensor."""
    if weight.dim() != 2:
        raise ValueError(f"{name}: fp8 quantizes 2-D Linear weights, got shape {tuple(weight.shape)}")
    w = weight.float()
    if not torch.isfinite(w).all():
        raise UsageError(f"tensor {name} contains inf or NaN; the source checkpoint is damaged.")
    if scaling == "row":
        amax = w.abs().amax(dim=1, keepdim=True)
    else:
        rows, cols = w.shape
        padded = F.pad(w.abs(), (0, -cols % BLOCK, 0, -rows % BLOCK))
        amax = padded.view(padded.shape[0] // BLOCK, BLOCK, padded.shape[1] // BLOCK, BLOCK).amax(dim=(1, 3))
    scale = amax / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (w / _expand(scale, w.shape, scaling)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, scaling: str, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The weight back from its codes and scales, in `dtype`."""
    return (codes.float() * _expand(scale, codes.shape, scaling)).to(dtype)


def _expand(scale: torch.Tensor, shape: torch.Size, scaling: str) -> torch.Tensor:
    if scaling == "row":
        return scale
    rows, cols = shape
    return scale.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]


def state_dict(weight: torch.Tensor, scaling: str, name: str) -> dict[str, torch.Tensor]:
    """The stored tensors of one weight `name` ('...q_proj.weight')."""
    codes, scale = quantize(weight, scaling, name=name)
    return {name: codes, f"{name[: -len('weight')]}{scale_name(scaling)}": scale}


def quantization_config(quant: dict) -> dict:
    """config.json's quantization_config, in the transformers format whose layout the artifact uses."""
    if quant["scaling"] == "row":
        return {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": quant["skip_modules"]}
    return {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK],
            "modules_to_not_convert": quant["skip_modules"]}


class Fp8Linear(nn.Linear):
    """A frozen Linear holding float8_e4m3fn codes and float32 scales.

    Forward: `torch._scaled_mm` (inputs quantized per row to e4m3 on the fly) where it can run: a CUDA device of
    capability >= 8.9, row scaling, bfloat16 input, both weight dimensions multiples of 16, no gradient wanted for the
    input, and a torch that runs row-wise scaled matmuls there. Otherwise (CPU, block scaling, training) the weight is
    dequantized to the input's dtype and multiplied.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, *, scaling: str, dtype: torch.dtype, device="meta"):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.scaling, self.compute_dtype = scaling, dtype  # peft sizes adapters by compute_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device), requires_grad=False)
        scales = torch.empty(scale_shape(out_features, in_features, scaling), dtype=torch.float32, device=device)
        self.register_parameter(scale_name(scaling), nn.Parameter(scales, requires_grad=False))

    @property
    def scale(self) -> torch.Tensor:
        return getattr(self, scale_name(self.scaling))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._scaled_mm_applies(x):
            return self._forward_scaled_mm(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, dequantize(self.weight, self.scale, self.scaling, x.dtype), bias)

    def _scaled_mm_applies(self, x: torch.Tensor) -> bool:
        return (x.is_cuda and self.scaling == "row" and x.dtype == torch.bfloat16 and not (x.requires_grad and torch.is_grad_enabled())
                and self.in_features % 16 == 0 and self.out_features % 16 == 0 and scaled_mm_works(x.device))

    def _forward_scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        codes, x_scale = _quantize_rows(rows)
        out = torch._scaled_mm(codes, self.weight.t(), scale_a=x_scale, scale_b=self.scale.t(), out_dtype=torch.bfloat16)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8 e4m3, {self.scaling} scales"


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row e4m3 codes of activations and their float32 scales (no finiteness check: hot path)."""
    scale = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@functools.cache
def scaled_mm_works(device: torch.device) -> bool:
    """Whether this torch runs row-wise scaled fp8 matmuls on `device` (capability >= 8.9; tried once, on 16x16)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        return False
    a = torch.ones(16, 16, device=device).to(FP8)
    ones = torch.ones(16, 1, device=device)
    try:
        out = torch._scaled_mm(a, a.t(), scale_a=ones, scale_b=ones.t(), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return bool((out == 16).all())
