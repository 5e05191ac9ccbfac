"""Triton kernels for the CUDA path: paged attention (decode with split-KV, prefill/verify with causal masks) and an
int4 weight-only GEMM over llmc's packing. Each has a torch reference of the same signature (reference.py).

They run on NVIDIA GPUs, and on the CPU under TRITON_INTERPRET=1 (set before triton is imported), which is
how the tests check them where there is no GPU.
"""

from __future__ import annotations


def triton_available() -> bool:
    """Whether triton imports here."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
