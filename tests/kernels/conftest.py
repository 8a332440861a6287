"""Kernel tests run the Triton kernels on the CPU through triton's interpreter: TRITON_INTERPRET must be set
before triton decorates them (i.e. before loadspec.kernels is first imported). With a CUDA GPU the kernels
are compiled for it instead, so the GPU-marked tests exercise the real kernels, not the interpreter."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _gpu_tests_run_the_kernels(request):
    """A GPU-marked kernel test must run the compiled Triton kernels, never a silent fallback to the reference."""
    if "gpu" in request.keywords and torch.cuda.is_available():
        from loadspec import kernels

        assert kernels.use_triton(torch.empty(1, device="cuda")), "Triton kernels unavailable on this GPU"
