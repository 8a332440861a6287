"""A LoRA linear layer as one autograd node: base matmul (4-bit weight dequantized on the fly) plus adapter.

    y = x @ W^T (+ bias) + scaling * (x_lora @ A^T) @ B^T          x_lora = dropout(x), or x itself

peft runs this as a chain of modules and autograd nodes (bitsandbytes' MatMul4Bit behind a custom
op, casts, the adapter's two matmuls, the add); in a QLoRA step of a 1B model on an H100 that Python
and dispatch work, not the GPU, set the step time (the GPU was busy 42% of it). Here one node does:

  forward   W = dequantize(W4) in the activations' dtype; y = x W^T; y += scaling * (x_lora A^T) B^T
            (the adapter in the activations' dtype, from its float32 master weights, as autocast does)
  backward  g = scaling * dy B;  dx = dy W (+ g A);  dA = g^T x_lora;  dB = scaling * dy^T (x_lora A^T)
            (W dequantized again, never kept; gradients of A and B land in their float32 masters)

The 4-bit weight is dequantized by bitsandbytes' own CUDA kernels, called directly (its
`dequantize_4bit` wraps the same kernels in several Python layers and dispatcher ops), so the weight is
bit for bit the one bitsandbytes computes; double-quantized absmax are turned back into float32 once per
layer and kept (see `_launch_arguments`). Elsewhere (CPU) bitsandbytes' `dequantize_4bit`.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from . import VERSIONS

VERSION = VERSIONS["lora"]


@functools.cache
def _native_dequantizers():
    """bitsandbytes' C entry points for blockwise dequantization, or None where they are not loaded."""
    try:
        import ctypes

        from bitsandbytes.cextension import lib
    except Exception:  # noqa: BLE001 - any failure means: use bitsandbytes' Python path
        return None
    names = [f"cdequantize_blockwise_{d}_{q}" for d in ("fp32", "bf16", "fp16") for q in ("nf4", "fp4")]
    names.append("cdequantize_blockwise_fp32")
    functions = {}
    for name in names:
        function = getattr(lib, name, None)
        if function is None:
            return None
        function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p]
        function.restype = None
        functions[name] = function
    return functions


# the current CUDA stream's handle (what bitsandbytes passes its kernels), without making a Stream object per call
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (lambda index: torch.cuda.current_stream(index).cuda_stream)
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """The weight of a bitsandbytes 4-bit parameter, in `state.dtype`, exactly as bitsandbytes dequantizes it."""
    with torch._C.DisableTorchFunctionSubclass():  # Params4bit's __torch_function__ would run for each attribute read
        launch = _launch_arguments(packed, state) if packed.is_cuda else None
        if launch is not None:
            device = packed.device
            if device.index == torch.cuda.current_device():  # the usual case: no context manager on this per-layer path
                return _dequantize_natively(packed, state, launch, _raw_stream(device.index))
            with _on(device) as stream:
                return _dequantize_natively(packed, state, launch, stream)
    from bitsandbytes.functional import dequantize_4bit as bnb_dequantize_4bit

    return bnb_dequantize_4bit(packed, state)


def _dequantize_natively(packed: torch.Tensor, state, launch, stream) -> torch.Tensor:
    """bitsandbytes' C dequantizer run with `_launch_arguments`' values on `stream` (of the current device)."""
    function, absmax, blocksize = launch
    out = torch.empty(state.shape, dtype=state.dtype, device=packed.device)
    function(None, packed.data_ptr(), absmax.data_ptr(), out.data_ptr(), blocksize, out.numel(), stream)
    return out


@contextlib.contextmanager
def _on(device: torch.device):
    """Make `device` the current CUDA device for the block (only if it is not already); yields its current stream's handle."""
    swap = device.index != torch.cuda.current_device()
    if swap:
        previous = torch.cuda.current_device()
        torch.cuda.set_device(device)
    try:
        yield _raw_stream(device.index)
    finally:
        if swap:
            torch.cuda.set_device(previous)


_LAUNCH_ATTR = "_loadspec_dequantize_launch"


def _launch_arguments(packed: torch.Tensor, state):
    """(bitsandbytes' C dequantizer for the values, float32 absmax, blocksize), kept on the QuantState and checked
    against the tensors' addresses (which change only if they move); None: use bitsandbytes' Python path.

    With double quantization the absmax are 8-bit codes that bitsandbytes turns back into float32 (one launch,
    then adding the offset: a second) before every dequantization. Here that is done once, with the same
    kernel and the same add, and the float32 absmax are kept: 4 bytes per block of `state.blocksize` weights
    (1/16 byte a weight at blocksize 64, 61 MB for a 1B Llama's linear layers), for one launch per dequantize
    instead of three. `forget_dequantize_cache` frees them."""
    key = (packed.data_ptr(), state.absmax.data_ptr())
    cached = getattr(state, _LAUNCH_ATTR, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    native = _native_dequantizers()
    launch = None
    if native is not None and state.dtype in _DTYPE_NAMES and state.quant_type in ("nf4", "fp4"):
        absmax = _float_absmax(state, native, packed.device) if state.nested else state.absmax
        if absmax is not None:
            launch = (native[f"cdequantize_blockwise_{_DTYPE_NAMES[state.dtype]}_{state.quant_type}"], absmax, state.blocksize)
    setattr(state, _LAUNCH_ATTR, (key, launch))
    return launch


def _float_absmax(state, native: dict, device: torch.device) -> torch.Tensor | None:
    """A double-quantized state's absmax in float32, as bitsandbytes computes them before each dequantization
    (None for a layout its C entry point does not take)."""
    inner = state.state2
    if not (inner.absmax.dtype == torch.float32 and inner.code.dtype == torch.float32 and state.absmax.dtype == torch.uint8):
        return None
    with _on(device) as stream:
        absmax = torch.empty(state.absmax.numel(), dtype=torch.float32, device=device)
        native["cdequantize_blockwise_fp32"](inner.code.data_ptr(), state.absmax.data_ptr(), inner.absmax.data_ptr(),
                                             absmax.data_ptr(), inner.blocksize, absmax.numel(), stream)
        absmax += state.offset
        torch.cuda.current_stream(device).synchronize()  # once a layer: a call on another stream may use them next
    return absmax


def forget_dequantize_cache(layer: torch.nn.Module) -> None:
    """Drop what `dequantize_4bit` keeps on a 4-bit layer's QuantState (the float32 absmax among it)."""
    state = getattr(layer._parameters.get("weight"), "quant_state", None)
    if state is not None:
        state.__dict__.pop(_LAUNCH_ATTR, None)


def base_weight(layer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A Linear or bitsandbytes Linear4bit layer's weight as a dense (out, in) matrix in `dtype`."""
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    return _as(weight if state is None else dequantize_4bit(weight, state), dtype)


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype` (a no-op `.to` still costs a dispatch per call: this is on the per-layer path)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, x_lora, lora_a, lora_b, layer, scaling):
        autocast = x.is_cuda and torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda") if autocast else x.dtype  # every operand in one dtype
        x2 = _as(x.reshape(-1, x.shape[-1]), dtype)
        xl2 = x2 if x_lora is None else _as(x_lora.reshape(-1, x_lora.shape[-1]), dtype)
        weight = base_weight(layer, dtype)
        if layer.bias is None:
            out = torch.mm(x2, weight.t())
        else:
            out = torch.addmm(_as(layer.bias, dtype), x2, weight.t())
        del weight
        a, b = _as(lora_a, dtype), _as(lora_b, dtype)
        down = torch.mm(xl2, a.t())
        out.addmm_(down, b.t(), alpha=scaling)
        ctx.save_for_backward(xl2, a, b, down)
        ctx.layer, ctx.scaling, ctx.separate = layer, scaling, x_lora is not None
        ctx.shapes = (x.shape, None if x_lora is None else x_lora.shape)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        xl2, a, b, down = ctx.saved_tensors
        need_x, need_xl, need_a, need_b = ctx.needs_input_grad[:4]
        dy2 = _as(dy.reshape(-1, dy.shape[-1]), a.dtype)
        scaling = ctx.scaling
        g = torch.mm(dy2, b)
        if scaling != 1.0:
            g.mul_(scaling)
        dx = dxl = da = db = None
        if need_x:
            dx = torch.mm(dy2, base_weight(ctx.layer, dy2.dtype))
            if not ctx.separate:
                dx.addmm_(g, a)
            dx = dx.view(ctx.shapes[0])
        if ctx.separate and need_xl:
            dxl = torch.mm(g, a).view(ctx.shapes[1])
        if need_a:
            da = torch.mm(g.t(), xl2)
        if need_b:
            db = torch.mm(dy2.t(), down)
            if scaling != 1.0:
                db.mul_(scaling)
        return dx, dxl, da, db, None, None


def lora_linear(x: torch.Tensor, layer: torch.nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                x_lora: torch.Tensor | None = None) -> torch.Tensor:
    """`layer(x) + scaling * (x_lora or x) @ lora_a^T @ lora_b^T` in one autograd node.

    `layer` is a frozen torch Linear or bitsandbytes Linear4bit (weight and bias without gradients);
    `lora_a` (r, in) and `lora_b` (out, r) may be float32 masters: they are cast to `x`'s dtype, and their
    gradients come back in their own dtype. Pass `x_lora` when the adapter sees another input (dropout).
    """
    return _LoraLinear.apply(x, x_lora, lora_a, lora_b, layer, float(scaling))


def reference_lora_linear(x, layer, lora_a, lora_b, scaling, x_lora=None):
    """The same in plain torch, as separate ops (what the fused node is tested against)."""
    dtype = x.dtype
    out = torch.nn.functional.linear(x, base_weight(layer, dtype), None if layer.bias is None else layer.bias.to(dtype))
    adapter_input = x if x_lora is None else x_lora
    return out + scaling * torch.nn.functional.linear(torch.nn.functional.linear(adapter_input, lora_a.to(dtype)), lora_b.to(dtype))
