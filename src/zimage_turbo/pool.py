"""Several copies of the model, one per device, generating at once: throughput on one machine.

    >>> from zimage_turbo import GeneratorPool
    >>> with GeneratorPool(devices="all") as pool:                          # doctest: +SKIP
    ...     for index, outcome in pool.as_completed(["a fox", "a ship", "a tree"], seed=7):
    ...         print(index, outcome)

Each replica is a :class:`~zimage_turbo.generator.Generator` restricted to its device
(``Generator(device="cuda:1")``): it plans, places and recovers from running out of memory on that card alone.
One worker thread per replica takes the next prompt as soon as its replica is free, so a faster card simply
does more of the work (a small card that streams the model makes fewer images, but adds them); torch releases
the GIL while it computes, so the threads run in parallel.

Seeds are those of :meth:`Generator.generate_many` for the same arguments (``seed + i`` for prompt ``i``), so
an image does not depend on which replica made it, nor on how many there are. A prompt that fails becomes a
:class:`PromptFailure` in its place; the others carry on. A replica whose GPU meets a CUDA error other than
out-of-memory (which leaves that card's context unusable) is retired: the prompt it was running goes to another
replica (once: a prompt that breaks two cards fails), and the others share the remaining work.

To split one model over several small cards instead, use a single ``Generator()``: the planner picks
``multi_gpu`` there (see docs/scaling.md).
"""

from __future__ import annotations

import collections.abc
import concurrent.futures
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import torch

from .errors import DeviceFailedError, GeneratorClosedError, InvalidRequestError, InvalidSettingsError, first_line
from .generator import Generator
from .pool_replicas import make_replicas, replica_name, wanted_devices
from .request import DEFAULT_STEPS, GenerationRequest, one_spelling, requests_for
from .result import GenerationResult
from .settings import ZImageSettings
from .strategies import strategy_from
from .task_inputs import DEFAULT_CONTROL_SCALE, ImageInput, task_inputs

__all__ = ["GeneratorPool", "Outcome", "PromptFailure"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class PromptFailure:
    """A prompt whose generation raised. It takes the prompt's place among the results; the others are kept.

    Attributes:
        index: the prompt's position in the list given.
        prompt: the prompt.
        error: the exception (for example :class:`~zimage_turbo.errors.NotEnoughMemoryError`).
        device: the replica's device that ran it (``"cuda:1"``, ``"cpu"``).
    """

    index: int
    prompt: str
    error: BaseException
    device: str = ""

    def __str__(self) -> str:
        return f"prompt {self.index} failed on {self.device or 'the default device'}: {first_line(self.error)}"


#: what each prompt gives: its result, or why it has none
Outcome: TypeAlias = GenerationResult | PromptFailure


class GeneratorPool:
    """One :class:`~zimage_turbo.generator.Generator` per device, sharing the prompts.

    Args:
        model: a repo id or local folder; overrides ``settings.model``.
        settings: settings shared by every replica (by default read from ``ZIMAGE_*`` variables and ``.env``).
        devices: ``"all"``: a replica on every visible GPU that can run the model alone, as the planner sees
            it for a 1024x1024 image: a small card streams its weights from host RAM and adds what it can (as
            long as host RAM holds the streamed copies); a card on which nothing fits gets no prompt. When one
            model spread over every GPU (``multi_gpu``) is predicted about as fast as those replicas together
            (two 12 GiB cards), or no card can run it alone, a single replica over every GPU instead; without
            CUDA GPUs, one replica on the CPU or Apple GPU. Or a list such as ``["cuda:0", "cuda:1"]`` or
            ``["cpu", "cpu"]``, taken as given: each replica then uses whatever strategy fits its card.
        strategy: a strategy name for every replica (default: ``settings.strategy``, usually ``"auto"``).
            ``"multi_gpu"`` and ``"multi_gpu_hybrid"`` are refused: a replica lives on one device.
        load: load every replica now instead of at the first generation.

    Replicas load one after another (diffusers and transformers change process-wide defaults while loading),
    then generate in parallel. Close the pool (or use it in a ``with`` block) to free their memory.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        settings: ZImageSettings | None = None,
        devices: str | Sequence[str | torch.device] = "all",
        strategy: str | None = None,
        load: bool = False,
    ) -> None:
        if settings is not None and not isinstance(settings, ZImageSettings):
            raise InvalidSettingsError(f"settings must be a ZImageSettings, got {type(settings).__name__}")
        base = settings if settings is not None else ZImageSettings()
        if model is not None:
            base = base.replace(model=os.fspath(model))
        self.settings = base
        name = strategy if strategy is not None else base.strategy
        strategy_from(name)  # refuses unknown names now, before anything loads
        if name in ("multi_gpu", "multi_gpu_hybrid"):
            raise InvalidRequestError(
                f"a pool replica runs on one device, and {name} spreads one model over several: for that, use "
                f"one Generator(strategy={name!r})"
            )
        self._strategy = name
        self._wanted = wanted_devices(devices)  # None: "all"
        self._lock = threading.Lock()
        self._replicas: list[Generator] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._idle: queue.SimpleQueue[Generator] = queue.SimpleQueue()
        self._healthy = 0  # replicas not retired
        self._retired: list[Generator] = []
        self._closed = False
        if load:
            self.load()

    # -- replicas ----------------------------------------------------------------------------------------

    @property
    def replicas(self) -> tuple[Generator, ...]:
        """The replicas, one per device (created, not loaded, on first access: for ``"all"`` this reads the
        model's sizes from its headers and the GPUs' free memory)."""
        with self._lock:
            return tuple(self._resolve())

    @property
    def devices(self) -> tuple[str, ...]:
        """Each replica's device, e.g. ``("cuda:0", "cuda:1")``; ``"default"`` for a replica not restricted to
        one device."""
        return tuple(replica_name(replica) for replica in self.replicas)

    def _resolve(self) -> list[Generator]:
        if self._closed:
            raise GeneratorClosedError("this GeneratorPool was closed; create a new one")
        if self._replicas is None:
            self._replicas = make_replicas(self._replica, self._strategy, self._wanted)
        return self._replicas

    def _replica(self, device: torch.device | None) -> Generator:
        return Generator(settings=self.settings, strategy=self._strategy, device=device)

    def load(self) -> GeneratorPool:
        """Load every replica now (otherwise the first generation does). Returns self."""
        with self._lock:
            self._start()
        return self

    def _start(self) -> concurrent.futures.ThreadPoolExecutor:
        replicas = self._resolve()
        if self._executor is None:
            for replica in replicas:
                replica.load()  # one at a time: loading is not thread-safe in diffusers and transformers
            for replica in replicas:
                self._idle.put(replica)
            self._healthy = len(replicas)
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=len(replicas), thread_name_prefix="zimage-turbo-replica"
            )
            logger.info("pool of %d replica(s): %s", len(replicas), ", ".join(replica_name(r) for r in replicas))
        return self._executor

    def close(self) -> None:
        """Cancel prompts not yet started, wait for those running, and release every replica.

        Another thread waiting for the cancelled prompts (``generate_many``, a loop over ``as_completed``)
        gets :class:`GeneratorClosedError` once the running prompts are done."""
        with self._lock:
            executor, self._executor = self._executor, None
            replicas, self._replicas = self._replicas or [], None
            self._closed = True
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        for replica in replicas:
            replica.close()

    def __enter__(self) -> GeneratorPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return "GeneratorPool(closed)"
        if self._replicas is None:
            wanted = "all" if self._wanted is None else [str(d) for d in self._wanted]
            return f"GeneratorPool(devices={wanted!r}, not resolved)"
        loaded = "loaded" if self._executor is not None else "not loaded"
        return f"GeneratorPool(devices={[replica_name(r) for r in self._replicas]!r}, {loaded})"

    # -- LoRA --------------------------------------------------------------------------------------------

    def load_lora(
        self,
        source: str | os.PathLike[str],
        *,
        scale: float = 1.0,
        name: str | None = None,
        weight_name: str | None = None,
    ) -> str:
        """:meth:`Generator.load_lora` on every replica (loading them). If one refuses it, those that took it
        unload it again before the error propagates. A replica busy with a prompt takes it after that prompt."""
        names: list[str] = []

        def load(replica: Generator) -> None:
            names.append(replica.load_lora(source, scale=scale, name=name, weight_name=weight_name))

        self._on_every_replica(load, undo=lambda replica: replica.unload_lora(names[0]))
        return names[0]

    def set_lora_scale(self, name: str, scale: float) -> None:
        """:meth:`Generator.set_lora_scale` on every replica."""
        self._on_every_replica(lambda replica: replica.set_lora_scale(name, scale))

    def unload_lora(self, name: str | None = None) -> None:
        """:meth:`Generator.unload_lora` on every replica."""
        self._on_every_replica(lambda replica: replica.unload_lora(name))

    @property
    def loras(self) -> dict[str, float]:
        """The LoRAs every replica has loaded, name -> scale."""
        with self._lock:
            replicas = [replica for replica in self._resolve() if replica not in self._retired]
        return replicas[0].loras if replicas else {}

    def _on_every_replica(
        self, action: Callable[[Generator], None], undo: Callable[[Generator], None] | None = None
    ) -> None:
        with self._lock:
            replicas = [replica for replica in self._resolve() if replica not in self._retired]
        done: list[Generator] = []
        try:
            for replica in replicas:
                action(replica)
                done.append(replica)
        except BaseException:
            for replica in done if undo is not None else ():
                assert undo is not None
                try:
                    undo(replica)
                except Exception as problem:  # the first error matters more
                    logger.error("could not undo a LoRA change on %s: %s", replica_name(replica), problem)
            raise

    # -- generation --------------------------------------------------------------------------------------

    def generate_many(
        self,
        prompts: Sequence[str],
        *,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        seed: int | Sequence[int] | None = None,
        guidance_scale: float = 0.0,
        negative_prompt: str | None = None,
        num_images: int | None = None,
        num_inference_steps: int | None = None,
        num_images_per_prompt: int | None = None,
        image: ImageInput | None = None,
        strength: float | None = None,
        mask_image: ImageInput | None = None,
        control_image: ImageInput | None = None,
        control_scale: float = DEFAULT_CONTROL_SCALE,
    ) -> list[Outcome]:
        """Generate for every prompt over the replicas; the outcomes keep the prompts' order.

        The arguments and seeds are those of :meth:`Generator.generate_many` (diffusers' names
        ``num_inference_steps`` and ``num_images_per_prompt`` too, ``image``, ``strength``, ``mask_image`` for
        image-to-image and inpainting, and ``control_image``, ``control_scale`` for the ControlNet; ``generator=``
        is not taken: replicas draw their noise in parallel, so give seeds): with the same arguments each
        image is the one a single Generator would make. Every prompt is validated before anything loads. A
        prompt that raises gives a :class:`PromptFailure` at its index; the others are unaffected.
        """
        steps = one_spelling("steps", steps, "num_inference_steps", num_inference_steps, DEFAULT_STEPS)
        num_images = one_spelling("num_images", num_images, "num_images_per_prompt", num_images_per_prompt, 1)
        requests = requests_for(
            prompts,
            height=height,
            width=width,
            steps=steps,
            seed=seed,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            num_images=num_images,
            inputs=task_inputs(image, mask_image, strength, control_image, control_scale),
        )
        return [outcome for _, outcome in self.generate_requests(requests, ordered=True)]

    def as_completed(
        self,
        prompts: Sequence[str],
        *,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        seed: int | Sequence[int] | None = None,
        guidance_scale: float = 0.0,
        negative_prompt: str | None = None,
        num_images: int | None = None,
        num_inference_steps: int | None = None,
        num_images_per_prompt: int | None = None,
        image: ImageInput | None = None,
        strength: float | None = None,
        mask_image: ImageInput | None = None,
        control_image: ImageInput | None = None,
        control_scale: float = DEFAULT_CONTROL_SCALE,
    ) -> Iterator[tuple[int, Outcome]]:
        """Like :meth:`generate_many`, but yields ``(index, outcome)`` as each prompt finishes.

        Generation starts at once, before the first ``next()``. Leaving the loop early cancels the prompts not
        yet started.
        """
        steps = one_spelling("steps", steps, "num_inference_steps", num_inference_steps, DEFAULT_STEPS)
        num_images = one_spelling("num_images", num_images, "num_images_per_prompt", num_images_per_prompt, 1)
        requests = requests_for(
            prompts,
            height=height,
            width=width,
            steps=steps,
            seed=seed,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            num_images=num_images,
            inputs=task_inputs(image, mask_image, strength, control_image, control_scale),
        )
        return self.generate_requests(requests)

    def generate_requests(
        self, requests: Sequence[GenerationRequest], *, ordered: bool = False
    ) -> collections.abc.Generator[tuple[int, Outcome], None, None]:
        """Run ready-made requests (each with its own size, steps and seed) over the replicas; yields
        ``(index, outcome)`` as they finish, or in the requests' order with ``ordered=True``.

        Requests without a seed get a random one now (the result reports it). Submission happens at once;
        closing the returned generator (or leaving a loop over it) cancels the requests not yet started.
        """
        with self._lock:
            executor = self._start()
            futures = [executor.submit(self._run, index, request.with_seed()) for index, request in enumerate(requests)]
        return _collect(futures, ordered)

    @property
    def retired(self) -> tuple[str, ...]:
        """Devices of the replicas retired after a CUDA error other than out-of-memory."""
        return tuple(replica_name(replica) for replica in self._retired)

    def _run(self, index: int, request: GenerationRequest) -> Outcome:
        broken = 0  # replicas this request was running on when their GPU failed
        while True:
            replica = self._take()
            if replica is None:
                error = DeviceFailedError(
                    "every replica of the pool met a CUDA error other than out-of-memory, which leaves a GPU's "
                    "context unusable; restart the process"
                )
                return PromptFailure(index, request.prompt, error)
            try:
                result = replica.generate(
                    request.prompt,
                    height=request.height,
                    width=request.width,
                    steps=request.steps,
                    seed=request.seed,
                    guidance_scale=request.guidance_scale,
                    negative_prompt=request.negative_prompt,
                    num_images=request.num_images,
                    **(request.inputs.arguments() if request.inputs is not None else {}),
                )
            except Exception as exc:
                if replica.device_failure is None:  # the prompt's own failure: the replica goes on
                    self._idle.put(replica)
                    logger.warning("prompt %d failed on %s: %s", index, replica_name(replica), first_line(exc))
                    return PromptFailure(index, request.prompt, exc, replica_name(replica))
                self._retire(replica)
                broken += 1
                if broken > 1:  # a second card broke on it: the prompt, not the card, is the likely cause
                    return PromptFailure(index, request.prompt, exc, replica_name(replica))
                continue
            self._idle.put(replica)
            return result

    def _take(self) -> Generator | None:
        """A free replica, waiting for one if need be; None once every replica is retired."""
        while True:
            if self._closed:  # the pool was closed while this prompt waited for a replica
                raise GeneratorClosedError("the pool was closed before this prompt started")
            try:
                return self._idle.get(timeout=0.05)
            except queue.Empty:
                with self._lock:
                    if self._healthy == 0:
                        return None

    def _retire(self, replica: Generator) -> None:
        with self._lock:
            self._healthy -= 1
            self._retired.append(replica)
        logger.error(
            "retiring the replica on %s after a CUDA error (%s); the other %d replica(s) take its prompts",
            replica_name(replica),
            replica.device_failure,
            self._healthy,
        )


def _collect(
    futures: list[concurrent.futures.Future[Outcome]], ordered: bool
) -> collections.abc.Generator[tuple[int, Outcome], None, None]:
    index_of = {future: index for index, future in enumerate(futures)}
    # Done callbacks also run when a future is cancelled (concurrent.futures.as_completed is never told of a
    # cancellation by the executor's shutdown, and would wait forever once the pool is closed).
    finished: queue.SimpleQueue[concurrent.futures.Future[Outcome]] = queue.SimpleQueue()
    for future in futures:
        future.add_done_callback(finished.put)
    try:
        for position in range(len(futures)):
            future = futures[position] if ordered else finished.get()
            yield index_of[future], _outcome(future, index_of[future])
    finally:
        # The consumer stopped early (or was interrupted): do not leave the replicas busy with unwanted work.
        for future in futures:
            future.cancel()


def _outcome(future: concurrent.futures.Future[Outcome], index: int) -> Outcome:
    try:
        return future.result()
    except concurrent.futures.CancelledError:
        # only close() cancels a prompt that someone still waits for
        raise GeneratorClosedError(f"the pool was closed before prompt {index} started") from None
