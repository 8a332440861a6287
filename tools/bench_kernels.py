"""Each fused kernel against eager torch and liger-kernel, forward + backward, on one GPU, in one run.

  python tools/bench_kernels.py [--tokens 16384] [--json OUT.json]

Shapes are Llama-3-8B's (hidden 4096, MLP 14336, 32 query / 8 KV heads of 128, vocab 128256) in bfloat16,
`--tokens` rows (batch x sequence). Times are medians of CUDA-event timings after warm-up; memory is the
peak allocated during one call beyond the inputs. liger-kernel is optional (a column of "-" without it).
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4096, 14336, 32, 8, 128, 128256


def _time(fn, reps: int = 20, warmup: int = 3) -> tuple[float, float]:
    """(median milliseconds, peak MiB above what was allocated before) of fn()."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20


def _fwd_bwd(fn, inputs, trainable: int):
    """A callable running fn(*inputs) forward and backward, with gradients for the first `trainable` inputs."""
    leaves = [x.detach().requires_grad_(i < trainable) for i, x in enumerate(inputs)]

    def run():
        for leaf in leaves:
            leaf.grad = None
        out = fn(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out) if out.dim() else None)
    return run


def _rope_eager(q, k, cos, sin):
    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _summed(fn):
    return lambda *a: sum(t.float().sum() for t in fn(*a))


def cases(tokens: int):
    """name -> (inputs, how many of them take gradients, {implementation: callable}) for forward+backward timing."""
    from loadspec.kernels import cross_entropy as ce, rmsnorm as rn, rope, swiglu

    try:
        from liger_kernel.transformers import functional as lk
    except ImportError:
        lk = None
    bf16, dev = torch.bfloat16, "cuda"
    g = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device=dev, dtype=bf16, generator=g) * scale

    x, w = randn(tokens, HIDDEN), randn(HIDDEN, scale=0.1) + 1
    gate, up = randn(tokens, MLP), randn(tokens, MLP)
    batch, seq = max(1, tokens // 4096), min(tokens, 4096)
    q, k = randn(batch, HEADS, seq, HEAD_DIM), randn(batch, KV_HEADS, seq, HEAD_DIM)
    angles = torch.arange(seq, device=dev)[:, None].float() * (10000 ** (-torch.arange(0, HEAD_DIM, 2, device=dev) / HEAD_DIM))
    emb = torch.cat((angles, angles), -1)
    cos, sin = emb.cos().to(bf16)[None].expand(batch, -1, -1), emb.sin().to(bf16)[None].expand(batch, -1, -1)
    ce_rows = min(tokens, 8192)
    logits, labels = randn(ce_rows, VOCAB), torch.randint(0, VOCAB, (ce_rows,), device=dev, generator=g)
    hidden, head = randn(ce_rows, HIDDEN), randn(VOCAB, HIDDEN, scale=0.02)
    table = {
        "rmsnorm": ((x, w), 2, {"eager": rn.reference_rmsnorm, "loadspec": rn.rmsnorm,
                             "liger": lk and (lambda a, b: lk.liger_rms_norm(a, b, 1e-6, 0.0, "llama", False))}),
        "rmsnorm_plus_one": ((x, w - 1), 2, {"eager": rn.reference_rmsnorm_plus_one, "loadspec": rn.rmsnorm_plus_one,
                                          "liger": lk and (lambda a, b: lk.liger_rms_norm(a, b, 1e-6, 1.0, "gemma", False))}),
        "swiglu": ((gate, up), 2, {"eager": lambda a, b: F.silu(a) * b, "loadspec": lambda a, b: swiglu.glu(a, b, "silu"),
                                "liger": lk and lk.liger_swiglu}),
        "geglu": ((gate, up), 2, {"eager": lambda a, b: F.gelu(a, approximate="tanh") * b,
                               "loadspec": lambda a, b: swiglu.glu(a, b, "gelu_tanh"), "liger": lk and lk.liger_geglu}),
        "rope": ((q, k, cos, sin), 2, {"eager": _summed(_rope_eager), "loadspec": _summed(rope.apply_rotary_pos_emb),
                                    "liger": lk and _summed(lambda a, b, c, s: lk.liger_rope(a, b, c, s))}),
        "cross_entropy": ((logits, labels), 1, {"eager": lambda a, t: F.cross_entropy(a.float(), t), "loadspec": ce.cross_entropy,
                                             "liger": lk and (lambda a, t: lk.liger_cross_entropy(a, t))}),
        "fused_linear_cross_entropy": ((hidden, head, labels), 1, {  # QLoRA: the head is frozen
            "eager": lambda h, wt, t: F.cross_entropy(F.linear(h, wt).float(), t),
            "loadspec": ce.fused_linear_cross_entropy,
            "liger": lk and (lambda h, wt, t: lk.liger_fused_linear_cross_entropy(h, wt, t))}),
    }
    return table


def nf4_case():
    """NF4 dequantization of an 8B MLP weight (forward only): the fused kernel vs bitsandbytes' CUDA path."""
    import bitsandbytes.functional as bnbf

    from loadspec.kernels import nf4

    weight = torch.randn(MLP, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    return {"bitsandbytes": _time(lambda: bnbf.dequantize_4bit(packed, state)),
            "loadspec": _time(lambda: nf4.dequantize_4bit(packed, state))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    results = {"gpu": torch.cuda.get_device_name(), "tokens": args.tokens, "kernels": {}}
    print(f"{results['gpu']}, bf16, {args.tokens} tokens, forward+backward; ms (peak MiB beyond inputs)")
    print(f"{'kernel':28} {'eager':>16} {'liger':>16} {'loadspec':>16} {'vs eager':>9} {'vs liger':>9}")
    for name, (inputs, trainable, impls) in cases(args.tokens).items():
        row = {impl: _time(_fwd_bwd(fn, inputs, trainable)) for impl, fn in impls.items() if fn}
        results["kernels"][name] = row
        cell = lambda impl: f"{row[impl][0]:7.3f} ({row[impl][1]:6.0f})" if impl in row else f"{'-':>16}"
        ratio = lambda impl: f"{row[impl][0] / row['loadspec'][0]:8.2f}x" if impl in row else f"{'-':>9}"
        print(f"{name:28} {cell('eager')} {cell('liger')} {cell('loadspec')} {ratio('eager')} {ratio('liger')}", flush=True)
        torch.cuda.empty_cache()
    try:
        row = nf4_case()
        results["kernels"]["nf4_dequantize (fwd only)"] = row
        print(f"{'nf4_dequantize (fwd only)':28} {'bitsandbytes':>8} {row['bitsandbytes'][0]:7.3f} ms   loadspec "
              f"{row['loadspec'][0]:7.3f} ms   {row['bitsandbytes'][0] / row['loadspec'][0]:.2f}x")
    except ImportError:
        print("nf4_dequantize: bitsandbytes not installed")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
