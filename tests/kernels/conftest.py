"""Kernel tests run the Triton kernels on the CPU through triton's interpreter: TRITON_INTERPRET must be set
before triton decorates them (i.e. before loadspec.kernels is first imported)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
