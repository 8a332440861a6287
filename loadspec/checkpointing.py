"""Gradient checkpointing: off, on, or on with the checkpointed activations offloaded to CPU memory.

`[train] gradient_checkpointing`:

* `false` — autograd keeps every activation of the forward pass for the backward pass.
* `true`  — each decoder layer keeps only its input; backward re-runs the layer from it.
* `"offload"` — as `true`, and the one tensor each layer keeps (its input, `layers x batch x
  sequence x hidden` bytes, what dominates at long sequences) waits for the backward pass in
  host memory instead of GPU memory:

  - forward: the copy to (pinned) host memory is queued on a side CUDA stream right after the
    layer's input is ready, so it overlaps the layer's own compute; the GPU copy is released
    as soon as the transfer has read it (`record_stream`);
  - backward: the input is copied back and the layer recomputed from it; while that layer's
    backward runs, the input of the layer below is already being copied back on the side
    stream (one layer of prefetch), so the compute stream rarely waits for PCIe.

How a layer is checkpointed (`checkpointed`): one autograd node per layer. Its forward runs the
layer without recording anything (no graph, no saved activations) and keeps the layer's positional
inputs (or their host copies); its backward re-runs the layer with autograd on, from those inputs,
under the RNG state and autocast settings of the first run, and back-propagates through it. This
is the "reentrant" scheme. torch's default non-reentrant checkpoint runs the first forward with
autograd recording and sends every tensor the layer saves through Python hooks, twice; on an H100
the Python work, not the GPU, set a 1B QLoRA step's time, and this scheme removes most of it.
A layer whose keyword inputs need gradients (the reentrant scheme would drop them) or whose
positional inputs need none (its parameters would get no gradient) uses torch's checkpoint instead.
As with any reentrant checkpoint, parameters inside a layer receive their gradients in `.grad`
(`loss.backward()`, what trainers call), not through `torch.autograd.grad`.
Tensors already in host memory (a model on the CPU) are kept as they are, so on a CPU-only
machine `"offload"` computes exactly what `true` does.

Checkpointing recomputes the same operations on the same inputs with the same RNG state
(dropout included), so gradients equal the ones without checkpointing; tests check equality.
Checkpointing acts only in training mode (`model.train()`).
"""
from __future__ import annotations

import contextlib
import functools
import weakref

import torch
from torch.utils.checkpoint import checkpoint

MODES = (False, True, "offload")


def describe(mode, target_kind: str) -> str:
    """The plan's reason line for a checkpointing mode."""
    if mode is False:
        return "gradient checkpointing off: every activation is kept for backward (fastest, most memory)"
    if mode is True:
        return "gradient checkpointing on: decoder layers recomputed in backward; each keeps only its input, on the device"
    if target_kind == "cpu":
        return ("gradient checkpointing offload: decoder layers recomputed in backward; on a CPU target their inputs "
                "already live in host memory, so this computes exactly what true does")
    return ("gradient checkpointing offload: decoder layers recomputed in backward; each layer's input waits in pinned host "
            "memory (copied on a side stream during forward, prefetched a layer ahead in backward)")


def enable(model, mode) -> None:
    """Set `model` (a transformers model, or a peft model around one) to checkpoint as `mode` says."""
    if mode not in MODES:
        raise ValueError(f"gradient_checkpointing must be one of {MODES}, got {mode!r}")
    if mode is False:
        return
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.config.use_cache = False  # a KV cache is useless in training and checkpointed layers refuse it; generate() keeps its own setting
    offloader = ActivationOffloader() if mode == "offload" else None
    function = functools.partial(checkpointed, offloader)
    for module in hf.modules():
        if hasattr(module, "gradient_checkpointing"):
            module._gradient_checkpointing_func = function
    if offloader is not None:
        hf._loadspec_offloader = offloader
        decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else None  # peft calls hf.forward directly, so hook the decoder
        (decoder or hf).register_forward_pre_hook(lambda *_: offloader.new_pass())
    if not any(p.requires_grad for p in hf.get_input_embeddings().parameters()) and not getattr(hf, "_require_grads_hooks", None):
        # a frozen base: the embeddings' output must require grad so gradients reach the adapters
        # through every checkpointed layer (transformers usually did this already)
        hf.enable_input_require_grads()


def checkpointed(offloader: "ActivationOffloader | None", function, *args, use_reentrant: bool = False, **kwargs):
    """Run `function(*args)` (a decoder layer, its keyword inputs bound) as one recomputed node; with an
    `offloader`, its positional inputs wait in host memory. See the module docstring."""
    keywords = getattr(function, "keywords", None) or {}
    if (kwargs or not torch.is_grad_enabled() or _needs_grad(keywords.values())
            or not _needs_grad(args) or any(not torch.is_tensor(a) for a in args)):
        with (contextlib.nullcontext() if offloader is None
              else torch.autograd.graph.saved_tensors_hooks(offloader.pack, offloader.unpack)):
            return checkpoint(function, *args, use_reentrant=False, **kwargs)
    outputs = _Recomputed.apply(function, offloader, *args)
    return outputs[0] if len(outputs) == 1 else outputs


def _needs_grad(values) -> bool:
    """Whether any tensor among `values` (or inside tuples / lists of them) requires grad."""
    for value in values:
        if isinstance(value, (tuple, list)):
            if _needs_grad(value):
                return True
        elif torch.is_tensor(value) and value.requires_grad:
            return True
    return False


class _Recomputed(torch.autograd.Function):
    """One layer: forward without autograd; backward recomputes it with autograd and back-propagates."""

    @staticmethod
    def forward(ctx, function, offloader, *args):
        ctx.function, ctx.offloader = function, offloader
        ctx.input_needs_grad = [a.requires_grad for a in args]
        ctx.device = next((a.device for a in args if a.is_cuda), None)
        ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(ctx.device) if ctx.device is not None else None)
        ctx.autocast = [(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) for kind in ("cuda", "cpu")]
        if offloader is None:
            ctx.save_for_backward(*args)
        else:
            ctx.stashes = [offloader.pack(a) for a in args]
        with torch.no_grad():
            outputs = function(*args)
        return outputs if isinstance(outputs, tuple) else (outputs,)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.offloader is None:
            stored = ctx.saved_tensors
        else:
            stored, ctx.stashes = [ctx.offloader.unpack(s) for s in ctx.stashes], None
        inputs = [t.detach().requires_grad_(needs) for t, needs in zip(stored, ctx.input_needs_grad)]
        devices = [ctx.device] if ctx.device is not None else []
        with torch.random.fork_rng(devices=devices), contextlib.ExitStack() as stack:
            torch.set_rng_state(ctx.rng[0])
            if ctx.device is not None:
                torch.cuda.set_rng_state(ctx.rng[1], ctx.device)
            for kind, enabled, dtype in ctx.autocast:
                stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
            with torch.enable_grad():
                outputs = ctx.function(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(out, grad) for out, grad in zip(outputs, grads)
                 if torch.is_tensor(out) and out.requires_grad and grad is not None]
        if pairs:
            torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
        return (None, None, *(t.grad if needs else None for t, needs in zip(inputs, ctx.input_needs_grad)))


class ActivationOffloader:
    """pack/unpack hooks that move saved tensors to host memory and back, asynchronously on CUDA."""

    def __init__(self):
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._last: weakref.ref | None = None  # the stash packed just before, in this forward pass

    def new_pass(self) -> None:
        """A new forward pass starts: its first layer has no layer below to prefetch."""
        self._last = None

    def pack(self, tensor: torch.Tensor):
        if tensor.device.type == "cpu" or tensor.numel() == 0:
            return tensor  # already in host memory (or nothing to move)
        stream = None
        if tensor.device.type == "cuda":
            stream = self._streams.get(tensor.device)
            if stream is None:
                stream = self._streams[tensor.device] = torch.cuda.Stream(tensor.device)
        stash = _Stash(tensor, stream, self._last)
        self._last = weakref.ref(stash)
        return stash

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        tensor = packed.fetch()
        below = packed.below() if packed.below is not None else None
        if below is not None:
            below.prefetch()  # the next layer backward will need
        return tensor


class _Stash:
    """One saved tensor in host memory: the copy out (forward) and back (backward)."""

    def __init__(self, tensor: torch.Tensor, stream, below: weakref.ref | None):
        self.device = tensor.device
        self.stream = stream
        self.below = below
        self.back: torch.Tensor | None = None  # prefetched device copy, not yet handed out
        self.back_ready = None
        if stream is None:  # not CUDA: a plain synchronous copy
            self.host = tensor.to("cpu")
            self.copied = None
            return
        self.host = torch.empty_like(tensor, device="cpu", pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(self.device))  # the tensor has been computed
        with torch.cuda.stream(stream):
            self.host.copy_(tensor, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record(stream)
        tensor.record_stream(stream)  # its GPU memory is not reused before the copy has read it

    def prefetch(self) -> None:
        if self.stream is None or self.back is not None:
            return
        with torch.cuda.stream(self.stream):  # after `copied` on this same stream
            self.back = self.host.to(self.device, non_blocking=True)
            self.back_ready = torch.cuda.Event()
            self.back_ready.record(self.stream)

    def fetch(self) -> torch.Tensor:
        if self.stream is None:
            return self.host.to(self.device)
        compute = torch.cuda.current_stream(self.device)
        if self.back is not None:
            compute.wait_event(self.back_ready)
            tensor, self.back = self.back, None
            tensor.record_stream(compute)  # made on the side stream, used (and freed) on this one
            return tensor
        compute.wait_event(self.copied)
        return self.host.to(self.device, non_blocking=True)
