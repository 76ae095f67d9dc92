"""One generation request, validated before any weights move.

The checks here are the cheap ones that need no model: types, ranges, multiples of 16. Everything that
:meth:`Generator.generate` accepts passes through :class:`GenerationRequest`, so a bad argument raises
:class:`~zimage_turbo.errors.InvalidRequestError` before a byte of weights is read.
"""

from __future__ import annotations

import math
import numbers
import operator
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from .errors import ControlNetError, InvalidRequestError
from .model import MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE

if TYPE_CHECKING:
    from .task_inputs import TaskInputs, TaskName

__all__ = [
    "DEFAULT_SIDE",
    "DEFAULT_STEPS",
    "MAX_IMAGES",
    "MAX_PROMPT_CHARS",
    "MAX_SEED",
    "MAX_SIDE",
    "MAX_STEPS",
    "MIN_SIDE",
    "SIDE_MULTIPLE",
    "GenerationRequest",
    "check_seed",
    "noise_sources",
    "one_spelling",
    "random_seed",
    "requests_for",
    "seed_or_generator",
]

DEFAULT_SIDE = 1024  # height and width of a text-to-image request that gives none
# diffusers >= 0.39 counts steps as transformer passes: 8 passes reproduce the official "9 step" schedule
# of Z-Image-Turbo (whose last step was a no-op). See docs/usage.md.
DEFAULT_STEPS = 8
MAX_STEPS = 200
MAX_IMAGES = 16
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed accepts
# The text encoder sees only the first 512 tokens (chat template included), roughly 2,000 characters of English
# or 700 of Chinese; a longer prompt is cut, and the result warns. Ten times that is accepted, so that a pasted
# description is cut rather than refused; beyond it a prompt is refused before it costs time and memory to
# tokenize (a service that passes user text through must not be made to tokenize megabytes).
MAX_PROMPT_CHARS = 20_000


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. Construction validates every field.

    ``seed`` may be None (a random seed is drawn by :meth:`with_seed`). Image ``k`` of a request starts from
    the noise of seed ``seed + k``, so any image of a batch can be reproduced alone (up to float rounding:
    batched matrix products round differently from single ones).

    ``inputs``: the images an image-to-image or inpainting request starts from (see
    :mod:`~zimage_turbo.task_inputs`); None for text-to-image.

    Examples:
        >>> GenerationRequest("a red fox", width=768, height=512).num_images
        1
        >>> GenerationRequest("a red fox", width=1000)
        Traceback (most recent call last):
        zimage_turbo.errors.InvalidRequestError: width must be a multiple of 16 between 256 and 2048 pixels, got
        1000 (nearest allowed: 1008)
    """

    prompt: str
    height: int = 1024
    width: int = 1024
    steps: int = DEFAULT_STEPS
    guidance_scale: float = 0.0
    negative_prompt: str | None = None
    num_images: int = 1
    seed: int | None = None
    inputs: TaskInputs | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt", _check_prompt("prompt", self.prompt))
        if self.negative_prompt is not None:
            object.__setattr__(self, "negative_prompt", _check_text("negative_prompt", self.negative_prompt))
        for side in ("height", "width"):
            object.__setattr__(self, side, _check_side(side, getattr(self, side)))
        object.__setattr__(self, "steps", _check_int("steps", self.steps, 1, MAX_STEPS))
        object.__setattr__(self, "num_images", _check_int("num_images", self.num_images, 1, MAX_IMAGES))
        object.__setattr__(self, "guidance_scale", _check_guidance(self.guidance_scale))
        if self.seed is not None:
            object.__setattr__(self, "seed", check_seed(self.seed))
            if self.seed + self.num_images - 1 > MAX_SEED:
                raise InvalidRequestError(
                    f"seed {self.seed} + {self.num_images - 1} exceeds the largest seed {MAX_SEED}: image k of "
                    "a request uses seed + k"
                )
        if self.inputs is not None:
            from .task_inputs import TaskInputs

            if not isinstance(self.inputs, TaskInputs):
                raise InvalidRequestError(f"inputs must be TaskInputs or None, got {type(self.inputs).__name__}")
            if self.denoising_steps < 1:
                raise InvalidRequestError(
                    f"strength {self.inputs.strength} leaves no denoising step of {self.steps}; raise strength or steps"
                )
            if self.inputs.task == "control_inpaint" and self.num_images > 1:
                raise ControlNetError(
                    f"ControlNet inpainting makes one image per request, got num_images={self.num_images}: diffusers' "
                    "ZImageControlNetInpaintPipeline does not repeat its mask for more. Give several seeds to "
                    "generate_many instead",
                    argument="num_images",
                )

    @property
    def task(self) -> TaskName:
        """``"text_to_image"``, or the task of the request's ``inputs``."""
        return "text_to_image" if self.inputs is None else self.inputs.task

    @property
    def denoising_steps(self) -> int:
        """Transformer passes the request runs: ``steps``, or fewer for a ``strength`` below 1."""
        if self.inputs is None:
            return self.steps
        from .task_inputs import denoising_steps

        return denoising_steps(self.steps, self.inputs.strength)

    def with_seed(self) -> GenerationRequest:
        """This request with a concrete seed (a random one if none was given)."""
        return self if self.seed is not None else replace(self, seed=random_seed(self.num_images))

    @property
    def seeds(self) -> tuple[int, ...]:
        """One seed per image: ``seed, seed + 1, ...``. Empty until a seed is set."""
        if self.seed is None:
            return ()
        return tuple(self.seed + k for k in range(self.num_images))


def requests_for(
    prompts: Sequence[str],
    *,
    height: int | None = None,
    width: int | None = None,
    steps: int = DEFAULT_STEPS,
    seed: int | Sequence[int] | None = None,
    guidance_scale: float = 0.0,
    negative_prompt: str | None = None,
    num_images: int = 1,
    seeded: bool = True,
    inputs: TaskInputs | None = None,
) -> list[GenerationRequest]:
    """One validated request per prompt, each with its seed, as ``Generator.generate_many`` makes them.

    ``seed`` may be one int (prompt ``i`` uses ``seed + i``), one seed per prompt, or None (a random seed each).
    Whoever runs the requests (one Generator, a pool of them) therefore makes the same images for the same
    arguments. No prompts: an empty list, after checking the shared arguments all the same.

    ``seeded=False``: the noise comes from elsewhere (a caller's ``torch.Generator``), so no seed is drawn and
    the requests' ``seed`` stays None; ``seed`` must then be None.

    ``inputs``: the input images every prompt starts from (image-to-image, inpainting). ``height`` and
    ``width`` default to 1024, or with ``inputs`` to the input's size (:meth:`TaskInputs.output_size`).
    """
    if isinstance(prompts, (str, bytes)):
        raise InvalidRequestError("generate_many takes a list of prompts; for one prompt use generate()")
    try:
        prompts = list(prompts)
    except TypeError:
        raise InvalidRequestError(f"prompts must be a list of strings, got {type(prompts).__name__}") from None
    seeds: list[int | None]
    if seed is None:
        seeds = [None] * len(prompts)
    elif isinstance(seed, Sequence) and not isinstance(seed, (str, bytes)):
        seeds = list(seed)
        if len(seeds) != len(prompts):
            raise InvalidRequestError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    else:
        first = check_seed(seed)
        seeds = [first + i for i in range(len(prompts))]
    if inputs is not None:
        height, width = inputs.output_size(height, width)
    shared: dict[str, Any] = {
        "height": DEFAULT_SIDE if height is None else height,
        "width": DEFAULT_SIDE if width is None else width,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "negative_prompt": negative_prompt,
        "num_images": num_images,
        "inputs": inputs,
    }
    if not prompts:
        GenerationRequest(prompt="-", **shared)  # nothing to generate; still refuse bad shared arguments
        return []
    pairs = zip(prompts, seeds, strict=True)
    made = [GenerationRequest(prompt=text, seed=each_seed, **shared) for text, each_seed in pairs]
    return [request.with_seed() for request in made] if seeded else made


def one_spelling(ours: str, our_value: Any, theirs: str, their_value: Any, default: Any) -> Any:
    """The value of an argument that has two names (ours and diffusers'), refusing a call that gives both;
    ``default`` when neither is given (None means "not given")."""
    if our_value is not None and their_value is not None:
        raise InvalidRequestError(
            f"{ours} and {theirs} are two names for the same argument ({theirs} is diffusers' name); give one, "
            f"got {ours}={our_value!r} and {theirs}={their_value!r}"
        )
    if our_value is not None:
        return our_value
    return their_value if their_value is not None else default


def check_seed(value: object) -> int:
    """``value`` as a seed (an integer in 0..2**64-1), or :class:`InvalidRequestError`."""
    return _check_int("seed", value, 0, MAX_SEED)


def random_seed(count: int = 1) -> int:
    """A random seed that leaves room for ``count`` consecutive seeds."""
    return secrets.randbelow(2**63 - count)


def _check_text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidRequestError(
            f"{name} is {len(value)} characters long; at most {MAX_PROMPT_CHARS} are accepted (the text encoder "
            "sees only the first 512 tokens, about 2,000 characters of English, and ignores the rest)"
        )
    if "\x00" in value:
        raise InvalidRequestError(f"{name} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # a lone surrogate (from a bad decode upstream): the tokenizer cannot take it
        raise InvalidRequestError(f"{name} is not valid Unicode text (it contains a lone surrogate)") from None
    return value


def _check_prompt(name: str, value: object) -> str:
    text = _check_text(name, value)
    if not text.strip():
        raise InvalidRequestError(f"{name} is empty; describe the image to generate")
    return text


def _check_int(name: str, value: Any, low: int, high: int) -> int:
    # operator.index accepts int and numpy integers but not floats, strings or None; bool is an int
    # subclass that is almost always a mistake here.
    if isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be an integer, got a bool ({value})")
    try:
        number = operator.index(value)
    except TypeError:
        raise InvalidRequestError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    if not low <= number <= high:
        raise InvalidRequestError(f"{name} must be between {low} and {high}, got {number}")
    return number


def _check_side(name: str, value: object) -> int:
    side = _check_int(name, value, -(2**31), 2**31)
    if not MIN_SIDE <= side <= MAX_SIDE or side % SIDE_MULTIPLE:
        nearest = min(max(math.floor(side / SIDE_MULTIPLE + 0.5) * SIDE_MULTIPLE, MIN_SIDE), MAX_SIDE)
        raise InvalidRequestError(
            f"{name} must be a multiple of {SIDE_MULTIPLE} between {MIN_SIDE} and {MAX_SIDE} pixels, "
            f"got {side} (nearest allowed: {nearest})"
        )
    return side


def _check_guidance(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidRequestError(f"guidance_scale must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise InvalidRequestError(f"guidance_scale must be a finite number >= 0, got {number}")
    return number


def seed_or_generator(seed: object, generator: object) -> None:
    """Both choose the initial noise: one of them may be given."""
    if seed is not None and generator is not None:
        raise InvalidRequestError(
            "seed and generator both choose the initial noise; give one (seed: an int, reproducible; "
            f"generator: a torch.Generator, as in diffusers), got seed={seed!r} and generator={generator!r}"
        )


def noise_sources(
    generator: object, prompts: int, num_images: int
) -> list[torch.Generator | list[torch.Generator] | None]:
    """For each prompt, what its initial noise is drawn from: the one generator given (shared, drawn from in
    prompt order), its slice of a list of them (one per image), or None (the request's seed)."""
    if generator is None:
        return [None] * prompts
    if isinstance(generator, torch.Generator):
        return [generator] * prompts
    if isinstance(generator, Sequence) and not isinstance(generator, (str, bytes)):
        each = list(generator)
        if not all(isinstance(g, torch.Generator) for g in each):
            raise InvalidRequestError("generator must be a torch.Generator or a list of them (one per image)")
        if len(each) != prompts * num_images:
            raise InvalidRequestError(
                f"got {len(each)} generators for {prompts} prompt(s) of {num_images} image(s): a list of generators "
                "holds one per image"
            )
        if len({g.device.type for g in each}) > 1:
            raise InvalidRequestError("the generators of a list must all be on the same kind of device")
        return [each[k * num_images : (k + 1) * num_images] for k in range(prompts)]
    raise InvalidRequestError(
        f"generator must be a torch.Generator or a list of them (one per image), got {type(generator).__name__}"
    )
