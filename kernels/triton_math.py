"""Small Triton device functions shared by the kernels (imported only where Triton is available)."""
import triton
import triton.language as tl


@triton.jit
def tanh(z):
    z = tl.minimum(tl.maximum(z, -20.0), 20.0)  # tanh is +-1 in float32 beyond; no exp overflow
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)
