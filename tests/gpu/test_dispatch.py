"""multi_gpu's accelerate dispatch path, run on a single GPU.

With two GPUs, test_multi_gpu.py runs the real thing. This test forces the same hooks and device maps onto one
card, so that the placement, the forward passes through accelerate's hooks, and their removal are checked on
every GPU machine: the image must equal full_gpu's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from zimage_turbo import Generator, Hardware, ModelProfile, MultiGPUDispatch, Workload, ZImageSettings
from zimage_turbo.strategies.multi_gpu import Assignment

pytestmark = pytest.mark.gpu
PROMPT = "a lighthouse on a rocky coast at sunset, oil painting"


class OneCardDispatch(MultiGPUDispatch):
    """Every block 'assigned' to GPU 0, through accelerate's dispatch hooks all the same."""

    _always_dispatch = True

    def target(self, hardware: Hardware) -> torch.device:
        return torch.device("cuda", 0)

    def assignment(self, profile: ModelProfile, hardware: Hardware, work: Workload) -> Assignment:
        return Assignment(
            main=0,
            transformer_blocks=tuple(0 for _ in profile.transformer.block_bytes),
            text_encoder_main=0,
            text_encoder_blocks=tuple(0 for _ in profile.text_encoder.block_bytes),
        )


def _pixels(image: Any) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.mark.parametrize("which", ["tiny", "full"])
def test_dispatched_model_gives_the_full_gpu_image(which: str, tiny_checkpoint: Path, full_checkpoint: Path) -> None:
    checkpoint = tiny_checkpoint if which == "tiny" else full_checkpoint
    settings = ZImageSettings(progress=False, dtype="bfloat16")
    gen = Generator(model=checkpoint, strategy="full_gpu", settings=settings)
    reference = gen.generate(PROMPT, height=1024, width=1024, seed=3).image
    gen.switch(OneCardDispatch())
    dispatched = gen.generate(PROMPT, height=1024, width=1024, seed=3)
    assert dispatched.strategy == "multi_gpu" and dispatched.fallbacks == ()
    assert hasattr(gen.pipeline.transformer.layers[0], "_hf_hook")  # really through accelerate's hooks
    # Nothing stays pinned on the host: accelerate copies the weights into new parameter objects, whose
    # host homes are released all the same (they held 12 GiB on two H200s before).
    assert gen.pipeline._zimage_turbo_homes.host_bytes < 2**30
    assert np.abs(_pixels(dispatched.image) - _pixels(reference)).max() <= 2
    gen.switch("full_gpu")  # hooks removed, weights back on one card, same image
    assert not hasattr(gen.pipeline.transformer.layers[0], "_hf_hook")
    again = gen.generate(PROMPT, height=1024, width=1024, seed=3).image
    assert np.array_equal(_pixels(again), _pixels(reference))
    gen.close()
