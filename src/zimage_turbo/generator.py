"""The public entry point: a loaded Z-Image-Turbo pipeline that turns prompts into images.

    >>> from zimage_turbo import Generator
    >>> gen = Generator()                                   # doctest: +SKIP
    >>> result = gen.generate("a red fox in the snow", seed=7)  # doctest: +SKIP
    >>> result.save("fox.png")                               # doctest: +SKIP

Loading is lazy: the model is found, checked and loaded by the first ``generate`` (or an explicit
``load()``), and that call's ``timings.load`` says how long it took. Arguments are validated before
that, so a bad argument never costs a 20 GB load.

One Generator serializes its calls with a lock: diffusers' scheduler and tokenizer are not thread-safe.
Use one Generator per GPU (or per process) for parallel work.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from .errors import GeneratorClosedError, InvalidRequestError, NumericalError
from .hardware import GIB, Hardware, detect_hardware, host_peak_rss_bytes
from .loader import load_pipeline, resolve_dtype
from .request import DEFAULT_STEPS, GenerationRequest, check_seed
from .result import GenerationResult, Timings
from .settings import ZImageSettings
from .sources import ResolvedModel, resolve_model
from .strategies import LoadStrategy, choose_default, strategy_from

__all__ = ["MAX_SEQUENCE_LENGTH", "Generator"]

logger = logging.getLogger(__name__)

# The text encoder sees at most this many tokens, chat template included; diffusers cuts the rest silently.
MAX_SEQUENCE_LENGTH = 512


class Generator:
    """Generates images with Z-Image-Turbo, placing the model to suit the hardware.

    Args:
        model: a repo id (``"Tongyi-MAI/Z-Image-Turbo"``) or a local folder; overrides ``settings.model``.
        settings: a :class:`~zimage_turbo.settings.ZImageSettings`; by default one is read from
            ``ZIMAGE_*`` environment variables and ``.env``.
        strategy: ``"auto"``, a strategy name, or a :class:`~zimage_turbo.strategies.LoadStrategy`
            instance; overrides ``settings.strategy``.
        load: load the model now instead of at the first ``generate``.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        settings: ZImageSettings | None = None,
        strategy: str | LoadStrategy | None = None,
        load: bool = False,
    ) -> None:
        base = settings if settings is not None else ZImageSettings()
        if model is not None:
            base = base.replace(model=os.fspath(model))
        self.settings = base
        # Validate now, before any loading: None means "auto".
        self._requested: LoadStrategy | None = strategy_from(strategy if strategy is not None else base.strategy)
        self._lock = threading.Lock()
        self._pipe: Any = None
        self._strategy: LoadStrategy | None = None
        self._hardware: Hardware | None = None
        self._model: ResolvedModel | None = None
        self._dtype: torch.dtype | None = None
        self._closed = False
        if load:
            self.load()

    # -- state -------------------------------------------------------------------------------------------

    @property
    def is_loaded(self) -> bool:
        return self._pipe is not None

    @property
    def strategy(self) -> LoadStrategy | None:
        """The strategy in use, once loaded."""
        return self._strategy

    @property
    def hardware(self) -> Hardware | None:
        """The hardware seen when the model was loaded."""
        return self._hardware

    @property
    def model(self) -> ResolvedModel | None:
        """The resolved model folder and its source, once loaded."""
        return self._model

    @property
    def dtype(self) -> torch.dtype | None:
        return self._dtype

    @property
    def pipeline(self) -> Any:
        """The underlying diffusers ``ZImagePipeline`` (None until loaded). Changing it voids our guarantees."""
        return self._pipe

    def __repr__(self) -> str:
        if self._closed:
            return "Generator(closed)"
        if self._pipe is None:
            return f"Generator(model={self.settings.model!r}, not loaded)"
        assert self._strategy is not None and self._model is not None
        return f"Generator(model={str(self._model.path)!r}, strategy={self._strategy.name!r}, dtype={self._dtype})"

    # -- lifecycle ---------------------------------------------------------------------------------------

    def load(self) -> Generator:
        """Find, check and load the model now (otherwise the first ``generate`` does). Returns self."""
        with self._lock:
            self._ensure_loaded()
        return self

    def close(self) -> None:
        """Release the model and its memory. The Generator cannot be used afterwards."""
        with self._lock:
            self._pipe = None
            self._closed = True
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _ensure_loaded(self) -> float:
        """Load if needed; return the seconds spent loading (0 when already loaded)."""
        if self._closed:
            raise GeneratorClosedError("this Generator was closed; create a new one")
        if self._pipe is not None:
            return 0.0
        started = time.perf_counter()
        model = resolve_model(self.settings)
        budget = self.settings.vram_budget_gib
        hardware = detect_hardware(vram_budget_bytes=None if budget is None else int(budget * GIB))
        strategy = self._requested or choose_default(hardware)
        device = strategy.load_device(hardware)
        dtype = resolve_dtype(self.settings.dtype, device, hardware)
        logger.info("loading %s (%s) with strategy %s, %s", model.path, model.source, strategy.name, dtype)
        pipe = load_pipeline(model.layout, dtype=dtype, device=device, progress=self.settings.progress)
        strategy.apply(pipe, hardware)
        self._pipe, self._strategy, self._hardware, self._model, self._dtype = (
            pipe,
            strategy,
            hardware,
            model,
            dtype,
        )
        seconds = time.perf_counter() - started
        logger.info("loaded in %.1f s", seconds)
        return seconds

    # -- generation --------------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        *,
        height: int = 1024,
        width: int = 1024,
        steps: int = DEFAULT_STEPS,
        seed: int | None = None,
        guidance_scale: float = 0.0,
        negative_prompt: str | None = None,
        num_images: int = 1,
    ) -> GenerationResult:
        """Generate ``num_images`` images for one prompt.

        Args:
            prompt: what to draw. Up to 512 tokens (chat template included) reach the model; a longer
                prompt is cut, and the result's ``warnings`` say so.
            height, width: pixels, multiples of 16 between 256 and 2048.
            steps: transformer passes. 8 (the default) is Z-Image-Turbo's official schedule, which its
                model card calls "9 steps" (the 9th was a no-op).
            seed: image ``k`` starts from the noise of ``seed + k``; None draws a random seed (reported in
                the result).
            guidance_scale: 0 for Turbo (distilled without guidance); above 0 runs classifier-free
                guidance and doubles the transformer's work.
            negative_prompt: used only when ``guidance_scale > 0``.
            num_images: images for this prompt (1 to 16), generated as one batch.
        """
        [result] = self.generate_many(
            [prompt],
            height=height,
            width=width,
            steps=steps,
            seed=seed,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            num_images=num_images,
        )
        return result

    def generate_many(
        self,
        prompts: Sequence[str],
        *,
        height: int = 1024,
        width: int = 1024,
        steps: int = DEFAULT_STEPS,
        seed: int | Sequence[int] | None = None,
        guidance_scale: float = 0.0,
        negative_prompt: str | None = None,
        num_images: int = 1,
    ) -> list[GenerationResult]:
        """Generate for several prompts in turn, reusing the loaded model; results keep the prompts' order.

        ``seed`` may be one int (prompt ``i`` uses ``seed + i``), one seed per prompt, or None (random
        seeds). The other arguments are those of :meth:`generate` and apply to every prompt. Every prompt
        is validated before the first image is generated.
        """
        if isinstance(prompts, str):
            raise InvalidRequestError("generate_many takes a list of prompts; for one prompt use generate()")
        prompts = list(prompts)
        seeds: list[int | None]
        if seed is None:
            seeds = [None] * len(prompts)
        elif isinstance(seed, (list, tuple)):
            seeds = list(seed)
            if len(seeds) != len(prompts):
                raise InvalidRequestError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        else:
            first = check_seed(seed)
            seeds = [first + i for i in range(len(prompts))]
        requests = [
            GenerationRequest(
                prompt=text,
                height=height,
                width=width,
                steps=steps,
                guidance_scale=guidance_scale,
                negative_prompt=negative_prompt,
                num_images=num_images,
                seed=each_seed,
            ).with_seed()
            for text, each_seed in zip(prompts, seeds, strict=True)
        ]
        results = []
        with self._lock:
            load_seconds = self._ensure_loaded()
            for request in _progress(requests, enabled=self.settings.progress and len(requests) > 1):
                results.append(self._run(request, load_seconds))
                load_seconds = 0.0
        return results

    def _run(self, request: GenerationRequest, load_seconds: float) -> GenerationResult:
        pipe = self._pipe
        assert self._strategy is not None and self._dtype is not None
        device = torch.device(pipe._execution_device)
        warnings = self._check_prompt(request)
        cfg = request.guidance_scale > 0
        _reset_peaks(device)
        with torch.inference_mode():
            start = _clock(device)
            positive, negative = pipe.encode_prompt(
                prompt=[request.prompt],
                device=device,
                do_classifier_free_guidance=cfg,
                negative_prompt=[request.negative_prompt] if cfg and request.negative_prompt else None,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
            )
            encoded = _clock(device)
            # One CPU generator per image: the same seed gives the same noise on every device, and image k
            # of a batch starts from the noise a single-image call with seed + k would use.
            generators = [torch.Generator("cpu").manual_seed(s) for s in request.seeds]
            latents = pipe(
                prompt_embeds=positive,
                negative_prompt_embeds=negative if cfg else None,
                height=request.height,
                width=request.width,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                num_images_per_prompt=request.num_images,
                generator=generators,
                output_type="latent",
                return_dict=False,
            )[0]
            denoised = _clock(device)
            if not bool(torch.isfinite(latents).all()):
                raise NumericalError(
                    f"the denoised latents contain NaN or infinity ({self._dtype} on {device}); the image "
                    "would be black. float16 does this on GPUs without bf16: use dtype='float32' or 'bfloat16'."
                )
            images = _decode(pipe, latents)
            decoded = _clock(device)
        return GenerationResult(
            images=tuple(images),
            prompt=request.prompt,
            seeds=request.seeds,
            width=request.width,
            height=request.height,
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            strategy=self._strategy.name,
            device=str(device),
            dtype=str(self._dtype).removeprefix("torch."),
            timings=Timings(
                load=load_seconds,
                encode=encoded - start,
                denoise=denoised - encoded,
                decode=decoded - denoised,
            ),
            peak_memory=_peaks(device),
            warnings=tuple(warnings),
        )

    def _check_prompt(self, request: GenerationRequest) -> list[str]:
        warnings = []
        tokens = count_prompt_tokens(self._pipe.tokenizer, request.prompt)
        if tokens > MAX_SEQUENCE_LENGTH:
            warnings.append(
                f"the prompt is {tokens} tokens with the chat template; the text encoder sees only the first "
                f"{MAX_SEQUENCE_LENGTH}, so the rest has no effect. Shorten it."
            )
        if request.negative_prompt is not None and request.guidance_scale == 0:
            warnings.append("negative_prompt has no effect when guidance_scale is 0")
        for warning in warnings:
            logger.warning(warning)
        return warnings


def count_prompt_tokens(tokenizer: Any, prompt: str) -> int:
    """Tokens the text encoder would be given for ``prompt``, chat template included, before any cut."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=True,
    )
    return len(tokenizer(text).input_ids)


def _decode(pipe: Any, latents: torch.Tensor) -> list[Any]:
    """The VAE half of ``ZImagePipeline.__call__``, run separately so that it can be timed (and retried)."""
    vae = pipe.vae
    latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    image = vae.decode(latents, return_dict=False)[0]
    return list(pipe.image_processor.postprocess(image, output_type="pil"))


def _clock(device: torch.device) -> float:
    """A timestamp after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


def _reset_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peaks(device: torch.device) -> dict[str, int]:
    peaks = {"host": host_peak_rss_bytes()}
    if device.type == "cuda":
        peaks[str(device)] = int(torch.cuda.max_memory_allocated(device))
    return peaks


def _progress(items: list[GenerationRequest], *, enabled: bool) -> Any:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="prompts", unit="prompt")
