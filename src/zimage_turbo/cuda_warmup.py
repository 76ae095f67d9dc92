"""The CUDA libraries' first use, paid on the early-read thread instead of by the first image.

A process's first matrix product, attention and convolution on a GPU load cuBLAS(Lt), the attention kernels and
cuDNN (large libraries, loaded lazily) and create their handles. A load that reads its weights ahead
(:mod:`~zimage_turbo.early_read`) runs each once, small, on that thread after its reads, while the main thread is
still importing diffusers and transformers: the libraries are loaded once per process, so the first image
finds them ready. Shapes follow the model (head size 128, the run dtype); the results are thrown away.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

__all__ = ["warm_cuda_libraries"]

logger = logging.getLogger(__name__)

HEAD_SIZE = 128  # Z-Image's transformer and its Qwen3 text encoder both attend with heads of 128


def warm_cuda_libraries(device: torch.device, dtype: torch.dtype) -> None:
    """Run a small matrix product, attention (plain and causal), convolution, group norm and upsampling on
    ``device`` in ``dtype`` and wait for them. A failure is logged, not raised: this only saves time."""
    started = time.perf_counter()
    try:
        with torch.inference_mode(), torch.cuda.device(device):
            matrix = torch.randn(256, 256, device=device, dtype=dtype)
            F.linear(matrix, matrix, matrix[0])
            heads = torch.randn(1, 2, 64, HEAD_SIZE, device=device, dtype=dtype)
            F.scaled_dot_product_attention(heads, heads, heads)
            F.scaled_dot_product_attention(heads, heads, heads, is_causal=True)
            image = torch.randn(1, 32, 16, 16, device=device, dtype=dtype)
            kernel = torch.randn(32, 32, 3, 3, device=device, dtype=dtype)
            image = F.conv2d(F.silu(F.group_norm(image, 8)), kernel, padding=1)
            F.interpolate(image, scale_factor=2.0, mode="nearest")
            torch.cuda.synchronize(device)
    except Exception as exc:  # the first image meets the same problem and reports it
        logger.debug("warming the CUDA libraries on %s failed: %s: %s", device, type(exc).__name__, exc)
        return
    logger.debug("CUDA libraries warmed on %s in %.2f s", device, time.perf_counter() - started)
