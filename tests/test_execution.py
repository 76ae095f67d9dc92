"""Where a placed pipeline computes: the execution device pinned per placement, and each phase's device.

diffusers names the text encoder's card as the pipeline's execution device when components sit on different
cards; the Generator pins the device the strategy computes on instead. These tests check that diffusers' own
calls follow the pin, that the Generator asks each placement once and lifts the pin when the placement goes,
and which card each phase of a multi-GPU assignment runs on (the GPU suite runs them on real cards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from zimage_turbo import CPUOnly, FullGPU, Generator, MultiGPUDispatch, MultiGPUHybrid, ZImageSettings
from zimage_turbo.execution import on_device, pin_execution_device, pinned_execution_device
from zimage_turbo.strategies.multi_gpu import Assignment

PROMPT = "a paper boat on a pond"


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint: Path) -> Any:
    from diffusers import ZImagePipeline

    loaded = ZImagePipeline.from_pretrained(tiny_checkpoint)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def test_diffusers_calls_follow_the_pinned_device(pipe: Any) -> None:
    from diffusers import ZImagePipeline

    assert pipe._execution_device == torch.device("cpu")
    pin_execution_device(pipe, torch.device("meta"))
    try:
        assert pipe._execution_device == torch.device("meta") and pinned_execution_device(pipe) == torch.device("meta")
        # Still the same pipeline to anyone who looks: same class name, isinstance, config.
        assert type(pipe).__name__ == "ZImagePipeline" and isinstance(pipe, ZImagePipeline)
        assert '"_class_name": "ZImagePipeline"' in pipe.to_json_string()  # what save_pretrained writes
        # diffusers makes the latents on the pinned device: the CPU transformer then meets a meta tensor.
        with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
            pipe(PROMPT, height=64, width=64, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    finally:
        pin_execution_device(pipe, None)
    assert pipe._execution_device == torch.device("cpu") and pinned_execution_device(pipe) is None
    image = pipe(PROMPT, height=64, width=64, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert image.images[0].size == (64, 64)


class Counting(CPUOnly):
    """The CPU strategy, counting how often the Generator asks where it computes."""

    asked = 0

    def execution_device(self, pipe: Any) -> torch.device:
        type(self).asked += 1
        assert pinned_execution_device(pipe) is None, "asked with an old pin still in place"
        return super().execution_device(pipe)


def test_the_generator_asks_once_per_placement_and_pins_the_answer(tiny_checkpoint: Path) -> None:
    Counting.asked = 0
    gen = Generator(model=tiny_checkpoint, strategy=Counting(), settings=ZImageSettings(progress=False))
    seen: list[Any] = []
    for _ in range(3):
        gen.generate(
            PROMPT,
            height=256,
            width=256,
            steps=1,
            seed=0,
            callback=lambda _: seen.append(pinned_execution_device(gen.pipeline)),
        )
    assert Counting.asked == 1 and seen == [torch.device("cpu")] * 3
    gen.switch(FullGPU(device="cpu"))  # a new placement: the pin goes with the old one
    assert pinned_execution_device(gen.pipeline) is None
    gen.switch(Counting())
    gen.generate(PROMPT, height=256, width=256, steps=1, seed=0)
    assert Counting.asked == 2


@pytest.mark.parametrize("cls", [MultiGPUDispatch, MultiGPUHybrid])
def test_each_phase_of_a_split_model_runs_on_its_card(cls: type[MultiGPUDispatch]) -> None:
    strategy = cls()
    # transformer and VAE on card 2 with blocks spread over 2 and 0; the text encoder on (or streamed onto) card 1
    strategy._placed = Assignment(
        main=2,
        transformer_blocks=(2, 2, 0),
        text_encoder_main=1,
        text_encoder_blocks=() if strategy.stream_text_encoder else (1, 1),
        text_encoder_streamed=strategy.stream_text_encoder,
    )
    assert strategy.execution_device(None) == torch.device("cuda", 2)  # latents, timesteps, the decode
    assert strategy.encode_device(None, torch.device("cuda", 2)) == torch.device("cuda", 1)


def test_on_device_changes_nothing_off_cuda() -> None:
    for device in (None, torch.device("cpu"), torch.device("meta")):
        with on_device(device) as entered:
            assert entered is None
