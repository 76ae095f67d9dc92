"""How many blocks the ``partial`` placement keeps on the GPU: a pure function of sizes, the card and the request.

A 12 GB card cannot hold the 11.5 GiB transformer with the rest, but it can hold most of it. Streaming every
block through the bus at every pass (``streamed``) wastes that room; ``partial`` keeps as many blocks resident
as fit and streams only the others, each through its pinned home, the next one copied while the current one
computes. This module decides how many, for each component, from the profile's block sizes, the activation
model for the request's size and the bytes the card can give:

* what must stay on the GPU through every phase: the VAE, the transformer's non-block weights, its resident
  blocks, and the text encoder's resident blocks (with its non-block weights, the 0.78 GB token embedding,
  whenever it keeps any block);
* on top of that, per phase (phases run one after another, so each has the whole card minus what stays):
  encoding needs the text encoder's embedding (when it is not resident) and two of its streamed blocks (the one
  computing and the one arriving), denoising two streamed transformer blocks, plus each phase's activations;
* time (:func:`partial_seconds`): streamed blocks are spread evenly over the execution order
  (:func:`streamed_blocks`), and each one's copy starts when the streamed block before it starts computing, so
  it overlaps the compute of that block and of the resident ones up to it: a streamed block costs the longer of
  its copy (at the card's pinned bandwidth) and that compute, plus a small fixed cost (hooks, synchronisation);
  resident blocks cost only their compute. So the transformer's resident blocks pay off eight times per image,
  the text encoder's once, and :func:`size_residency` picks the fastest split that fits, or among splits
  within :data:`NEAR_TIE` of it the one with the most transformer blocks.
* lookahead (the transformer's): with 1, as above, the host waits for each streamed block's compute before
  going on, so a copy cannot start before the streamed block ahead of it computes, and the bus idles while
  resident blocks compute (traced on the H200 at 8 GiB: 0.33 s of 1.7 s per image). With ``L`` > 1 the host may
  run ``L - 1`` streamed blocks ahead of the GPU: the copy of streamed block ``j`` starts once copy ``j - 1``
  is done and the GPU has started streamed block ``j - L``, so the bus keeps busy across resident blocks; it
  holds ``L + 1`` streamed blocks on the GPU instead of 2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..profile import ComponentProfile, ModelProfile, Workload
from .base import quantized_block_bytes
from .streaming import BLOCK_OVERHEAD_S

__all__ = [
    "NEAR_TIE",
    "Residency",
    "partial_seconds",
    "partial_weights",
    "size_residency",
    "streamed_blocks",
]


# Splits predicted this close to the fastest count as a tie, won by the one keeping more transformer blocks. The
# predicted time is flat across very different splits (at 12 GiB on the H200, partial(18,9) 1.499 s, (12,19)
# 1.502 s), so without it 100 MB less free memory swapped one for the other; and the transformer's resident
# blocks are the ones that compile whole (a streamed one compiles only its insides): compiled, (18,9) ran 1.21
# s/image and a split streaming 22 transformer blocks about 1.48 s, both before the insides compiled
# (benchmarks/results/partial-lookahead-compiled-h200-2026-11-29.json and
# bench-partial-compile-lookahead2-h200-2026-11-29.json).
NEAR_TIE = 0.01


@dataclass(frozen=True)
class Residency:
    """Blocks kept on the GPU: ``transformer`` of the transformer's blocks and ``text_encoder`` of the text
    encoder's (its non-block weights stay too whenever it keeps any block). The others stream."""

    transformer: int
    text_encoder: int

    def clamped(self, profile: ModelProfile) -> Residency:
        """Counts within what the model has (0 to its number of blocks)."""
        return Residency(
            max(0, min(self.transformer, len(profile.transformer.block_bytes))),
            max(0, min(self.text_encoder, len(profile.text_encoder.block_bytes))),
        )


def streamed_blocks(total: int, resident: int) -> tuple[int, ...]:
    """Positions (in execution order) of the blocks that stream when ``resident`` of ``total`` stay: spread
    evenly, the last block always among them and the first only when all stream, so that resident blocks sit
    between streamed ones and before the first (whose copy starts with the module's call)."""
    count = total - max(0, min(resident, total))
    return tuple(((k + 1) * total + count - 1) // count - 1 for k in range(count))


@dataclass(frozen=True)
class _Split:
    """One component's bytes for each resident count ``c`` (index ``c``): resident, and the largest streamed
    block; and each block's bytes, in execution order."""

    resident: tuple[int, ...]
    largest_streamed: tuple[int, ...]
    other: int
    block_bytes: tuple[int, ...]

    @property
    def blocks(self) -> int:
        return len(self.block_bytes)

    def run_seconds(self, profile: ModelProfile, compute: float, resident: int, lookahead: int = 1) -> float:
        """Seconds of one run through every block with ``resident`` of them resident, ``compute`` seconds for
        all of them resident (shared evenly). Copies run one after another on the bus; the copy of streamed
        block ``j`` starts when copy ``j - 1`` is done and the GPU has started streamed block ``j - lookahead``
        (the module's call for the first ones); a streamed block computes once its copy is done and the block
        before it has computed, after a fixed cost (hooks, synchronisation)."""
        per_block = compute / max(self.blocks, 1)
        positions = streamed_blocks(self.blocks, resident)
        starts: list[float] = []  # when the GPU starts each streamed block
        copy_end = 0.0
        gpu = 0.0  # when the GPU is free for the next block
        done = 0  # blocks computed so far, in execution order
        for j, position in enumerate(positions):
            gate = starts[j - lookahead] if j >= lookahead else 0.0
            copy_end = max(copy_end, gate) + profile.transfer_seconds(self.block_bytes[position])
            gpu += (position - done) * per_block  # the resident blocks before it
            gpu = max(gpu, copy_end) + BLOCK_OVERHEAD_S
            starts.append(gpu)
            gpu += per_block
            done = position + 1
        return gpu + (self.blocks - done) * per_block


def _split(component: ComponentProfile, block_bytes: Sequence[int]) -> _Split:
    total = len(block_bytes)
    resident, largest = [], []
    for count in range(total + 1):
        moving = [block_bytes[i] for i in streamed_blocks(total, count)]
        resident.append(sum(block_bytes) - sum(moving))
        largest.append(max(moving, default=0))
    return _Split(tuple(resident), tuple(largest), component.other_bytes, tuple(block_bytes))


def _splits(profile: ModelProfile, quantize: str | None) -> tuple[_Split, _Split]:
    """(transformer, text encoder); quantization shrinks the transformer's blocks, resident or streamed."""
    transformer = profile.transformer
    blocks = [quantized_block_bytes(profile, quantize, size) for size in transformer.block_bytes]
    return _split(transformer, blocks), _split(profile.text_encoder, profile.text_encoder.block_bytes)


def partial_weights(
    profile: ModelProfile, residency: Residency, quantize: str | None = None, lookahead: int = 1
) -> dict[str, int]:
    """Weight bytes on the GPU in each phase (``encode``, ``denoise``, ``decode``) under ``residency``, with the
    transformer's streamed blocks copied ``lookahead`` ahead."""
    transformer, text = _splits(profile, quantize)
    return _weights(profile, transformer, text, residency.clamped(profile), lookahead)


def _weights(
    profile: ModelProfile, transformer: _Split, text: _Split, residency: Residency, lookahead: int
) -> dict[str, int]:
    n, m = residency.transformer, residency.text_encoder
    stay = profile.vae.weight_bytes + transformer.other + transformer.resident[n]
    if m:
        stay += text.other + text.resident[m]
    encode = stay + 2 * text.largest_streamed[m] + (0 if m else text.other)
    # the one computing and ``lookahead`` arriving (with a lookahead of 1 the one before is freed first)
    denoise = stay + (lookahead + 1) * transformer.largest_streamed[n]
    return {"encode": encode, "denoise": denoise, "decode": stay}


def partial_seconds(
    profile: ModelProfile,
    compute: Mapping[str, float],
    steps: int,
    residency: Residency,
    quantize: str | None = None,
    lookahead: int = 1,
) -> float:
    """Seconds per image under ``residency``, from each phase's eager ``compute`` seconds (everything resident),
    with the transformer's streamed blocks copied ``lookahead`` ahead."""
    transformer, text = _splits(profile, quantize)
    return _seconds(profile, compute, steps, transformer, text, residency.clamped(profile), lookahead)


def _seconds(
    profile: ModelProfile,
    compute: Mapping[str, float],
    steps: int,
    transformer: _Split,
    text: _Split,
    residency: Residency,
    lookahead: int,
) -> float:
    n, m = residency.transformer, residency.text_encoder
    per_pass = transformer.run_seconds(profile, compute["denoise"] / max(steps, 1), n, lookahead)
    encode = text.run_seconds(profile, compute["encode"], m)
    if not m:
        encode += profile.transfer_seconds(text.other)  # the embedding, from its pinned home once per prompt
    # the VAE stays resident: its encoder's pass over input images (image tasks) costs what it costs anywhere
    return encode + compute["encode_image"] + steps * per_pass + compute["decode"]


def size_residency(
    profile: ModelProfile,
    work: Workload,
    compute: Mapping[str, float],
    steps: int,
    capacity: int,
    *,
    quantize: str | None = None,
    transformer: int | None = None,
    text_encoder: int | None = None,
    lookahead: int = 1,
) -> Residency | None:
    """The residency with the most transformer blocks among those predicted within :data:`NEAR_TIE` of the
    fastest, of those whose every phase (weights plus activations) stays within ``capacity`` bytes; for each
    transformer count, the most text-encoder blocks that fit. ``transformer`` or ``text_encoder`` fix that
    count. None when nothing fits, not even everything streamed.

    ``compute``: each phase's eager seconds with everything resident (quantization's cost included);
    ``lookahead``: how far ahead the transformer's streamed blocks are copied (more room, more overlap)."""
    tr_split, te_split = _splits(profile, quantize)
    acts = profile.activation_bytes(work)
    tr_counts = [transformer] if transformer is not None else range(tr_split.blocks, -1, -1)
    te_counts = [text_encoder] if text_encoder is not None else range(te_split.blocks, -1, -1)
    fitting: list[tuple[float, Residency]] = []  # most transformer blocks first
    for n in tr_counts:
        for m in te_counts:  # the most text-encoder blocks that fit with n: more is never slower
            residency = Residency(n, m).clamped(profile)
            weights = _weights(profile, tr_split, te_split, residency, lookahead)
            if all(weights[phase] + acts[phase] <= capacity for phase in weights):
                seconds = _seconds(profile, compute, steps, tr_split, te_split, residency, lookahead)
                fitting.append((seconds, residency))
                break
    if not fitting:
        return None
    fastest = min(seconds for seconds, _ in fitting)
    return next(residency for seconds, residency in fitting if seconds <= fastest * (1 + NEAR_TIE))
