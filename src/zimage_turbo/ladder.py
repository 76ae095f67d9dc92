"""The retry ladder: the rungs to try for a request, climbing them when memory runs out, and smaller sizes last.

For a request the planner ranks the placements that fit; the strategy in use (or the one asked for) goes
first while it still fits. When a rung runs out of memory, a smaller variant of its own strategy comes next if it
offers one (``partial`` with half its resident blocks: :meth:`~zimage_turbo.strategies.LoadStrategy.smaller`),
else the next rung worth trying, which needs less memory in the phase that failed; the weights move on the same
modules and the phases already finished are kept. A rung
that fails on its first use for a reason other than memory is marked broken and the next one takes over.
With ``allow_downscale`` smaller sizes are tried when nothing fits. Every change is a
:class:`~zimage_turbo.result.Fallback` in the call's list.

Nothing here knows the Generator: it gets the placement, a planning function and a function that runs one
rung (:func:`~zimage_turbo.tasks.run_task` with the Generator's speed-ups bound).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from .errors import NotEnoughMemoryError, PlacementFailedError, ZImageError, first_line
from .failures import is_device_failure, is_out_of_memory
from .phases import Progress, release_memory
from .placement import Placement
from .planner import Candidate, Plan, candidate_for, smaller_workloads
from .profile import Workload
from .request import GenerationRequest
from .result import Fallback
from .strategies import LoadStrategy
from .tasks import Attempt, Call

__all__ = ["Ladder", "failure_text"]

logger = logging.getLogger(__name__)

PlanFor = Callable[[GenerationRequest | Workload], Plan]
RunRung = Callable[[Call, GenerationRequest, Candidate, Progress], Attempt]


class Ladder:
    """The rungs of one Generator's placement.

    Args:
        placement: the loaded pipeline and what is applied.
        requested: the strategy asked for (None: ``auto``).
        plan_for: ranks the candidates for a request or a workload on the hardware as it is now.
        run: runs one rung for a request, from the progress given.
        allow_downscale: try smaller sizes when nothing fits.
    """

    def __init__(
        self,
        placement: Placement,
        *,
        requested: LoadStrategy | None,
        plan_for: PlanFor,
        run: RunRung,
        allow_downscale: bool,
    ) -> None:
        self.placement = placement
        self.requested = requested
        self.plan_for = plan_for
        self.run = run
        self.allow_downscale = allow_downscale

    def climb(self, call: Call, request: GenerationRequest) -> tuple[GenerationRequest, Attempt]:
        """The request (smaller, if it had to be) and the rung that made its images."""
        attempt = self._climb(call, request)
        if attempt is None and self.allow_downscale and _memory_was_short(call.fallbacks):
            for smaller in smaller_workloads(Workload.of(request)):
                shrunk = replace(request, height=smaller.height, width=smaller.width)
                call.fallbacks.append(
                    Fallback(
                        "downscale",
                        f"{request.width}x{request.height}",
                        f"{shrunk.width}x{shrunk.height}",
                        "plan",
                        "nothing fitted at the requested size (allow_downscale is on)",
                    )
                )
                attempt = self._climb(call, shrunk)
                if attempt is not None:
                    request = shrunk
                    break
        if attempt is None:
            raise self._out_of_rungs(request, call.fallbacks)
        return request, attempt

    def place_first(self, rung: Candidate) -> list[Fallback]:
        """Apply ``rung`` right after loading. If it runs out of memory, its smaller variants in turn (``partial``
        with half its resident blocks), as the ladder would; the fallbacks of what failed, each marked unplaceable
        (out of memory) or broken (another failure that counts against it). After a failure with nothing smaller
        to try, every weight is back home and the first generation's ladder takes over."""
        fallbacks: list[Fallback] = []
        while True:
            message, memory = self._place(rung)
            if message is None:
                return fallbacks
            release_memory()  # out of the except block: the failed frames are gone
            smaller = None
            if memory:
                smaller = self._smaller(rung, self.plan_for(Workload(vae_tiling=rung.vae_tiling)), "place")
            after = smaller.name if smaller is not None else ""
            fallbacks.append(Fallback("strategy" if memory else "error", rung.name, after, "place", message))
            placement = self.placement
            (placement.unplaceable if memory else placement.broken).add(rung.strategy)
            placement.leave()
            release_memory()
            if smaller is None:
                return fallbacks
            rung = smaller

    def _place(self, rung: Candidate) -> tuple[str | None, bool]:
        """Apply ``rung``; on failure (its message, whether memory ran out), *after* the except block."""
        message = None
        try:
            self.placement.use(rung)
            return None, True
        except Exception as exc:
            if not is_out_of_memory(exc) and not self.counts_against(rung, exc, None):
                raise
            memory, message = is_out_of_memory(exc), failure_text(exc)
        return message, memory

    def counts_against(self, rung: Candidate, exc: BaseException, callback_error: BaseException | None) -> bool:
        """Whether ``exc`` (not an out-of-memory error) counts against the placement rather than the caller: the
        placement has not produced an image yet in this Generator (a device mismatch, a kernel that cannot run
        on that card), and nothing says otherwise (our own errors, the user's callback, a CUDA error that
        poisoned the context and rules out any retry)."""
        return (
            rung.strategy not in self.placement.proven
            and exc is not callback_error
            and not isinstance(exc, ZImageError)
            and not is_device_failure(exc)
        )

    def rungs(self, ranked: Plan) -> list[Candidate]:
        """The order to try: the one in use if it still fits, else the requested strategy sized again for this
        request if that fits, else the plan's best; then every other candidate that fits; then, if none fits,
        the one needing least memory."""
        placement = self.placement
        first: Candidate | None = None
        keep = placement.active or self.requested
        if keep is not None:
            # A decode that needed tiles at this size under the strategy in use will need them again.
            work = ranked.workload
            tiled = work.vae_tiling or (
                keep is placement.active
                and placement.tile_from is not None
                and work.pixels * work.images >= placement.tile_from
            )
            for candidate in ranked.candidates:
                if candidate.strategy == keep and candidate.vae_tiling == tiled:
                    first = candidate
                    break
            else:
                first = self._candidate(keep, ranked)
            if keep is not self.requested and not first.fits:
                # The strategy in use no longer fits this request. One the user named, sized again for it, comes
                # first if it fits then (a `partial` sized at load holding fewer blocks now), rather than the
                # planner's pick; else (a fallback in use, or 'auto') re-plan.
                again = None if self.requested is None else self._candidate(self.requested, ranked)
                first = again if again is not None and again.fits else None
        rungs = [first] if first is not None else []
        rungs += [c for c in ranked.fitting if c not in rungs]
        if not ranked.fitting:
            least = min(ranked.candidates, key=lambda c: c.peak_bytes)
            if least not in rungs:
                rungs.append(least)
        # A strategy whose weights did not fit on the card will not fit now either (the model has not shrunk).
        return [rung for rung in rungs if rung.strategy not in placement.unplaceable | placement.broken]

    def _candidate(self, strategy: LoadStrategy, ranked: Plan) -> Candidate:
        """``strategy`` with the sizes it leaves open decided for ``ranked``'s request and hardware."""
        return candidate_for(
            strategy,
            self.placement.profile,
            ranked.hardware,
            ranked.workload,
            steps=ranked.steps,
            reserve_bytes=ranked.reserve_bytes,
        )

    def _climb(self, call: Call, request: GenerationRequest) -> Attempt | None:
        """Try the rungs for ``request`` in order; None when every one failed."""
        placement = self.placement
        ranked = self.plan_for(request)
        progress = Progress()
        failed: Candidate | None = None
        failed_phase = ""
        rungs = deque(self.rungs(ranked))
        smaller: Candidate | None = None  # the variant the last failed rung offered (it says it needs less)
        while rungs:
            rung = rungs.popleft()
            if failed is not None and rung is not smaller and not _needs_less(rung, failed, failed_phase):
                continue
            outcome, failure, memory = self._attempt(call, request, rung, progress)
            if failure is None:
                assert outcome is not None
                placement.proven.add(rung.strategy)
                return outcome
            release_memory()  # we are out of the except block: the failed frames are gone
            if not memory:
                # A bug of that placement on this machine: say so loudly, never use it again here, and let the
                # next rung (on the same weights, all of them sent home first) make the image.
                call.fallbacks.append(Fallback("error", rung.name, "", progress.phase, failure))
                placement.broken.add(rung.strategy)
                placement.unsettled = True
                logger.warning(
                    "%s failed on its first use while %s, so this Generator will not use it again; trying the next "
                    "placement. Please report it: %s",
                    rung.name,
                    _doing(progress.phase),
                    failure,
                )
                continue
            smaller = self._smaller(rung, ranked, progress.phase)
            call.fallbacks.append(
                Fallback("strategy", rung.name, smaller.name if smaller else "", progress.phase, failure)
            )
            if progress.phase == "place":
                placement.unplaceable.add(rung.strategy)
            logger.warning("%s ran out of memory while %s: %s", rung.name, _doing(progress.phase), failure)
            failed, failed_phase = rung, progress.phase  # the next rung's use() moves the weights
            if smaller is not None:
                rungs.appendleft(smaller)  # the same strategy keeping less on the GPU, before any other
        return None

    def _smaller(self, rung: Candidate, ranked: Plan, phase: str) -> Candidate | None:
        """The rung's strategy in a variant that needs less memory in ``phase`` (``partial`` with half its
        resident blocks), estimated for the same workload, unless this Generator has ruled it out already."""
        strategy = rung.strategy.smaller(phase)
        placement = self.placement
        if strategy is None or strategy in placement.unplaceable | placement.broken:
            return None
        work = replace(ranked.workload, vae_tiling=rung.vae_tiling)
        hardware = ranked.hardware
        return candidate_for(
            strategy, placement.profile, hardware, work, steps=ranked.steps, reserve_bytes=ranked.reserve_bytes
        )

    def _attempt(
        self, call: Call, request: GenerationRequest, rung: Candidate, progress: Progress
    ) -> tuple[Attempt | None, str | None, bool]:
        """The rung's attempt, or why it failed and whether memory ran out, *after* the except block. What the
        user's callback raised is passed on unchanged, even an out-of-memory error: it is the caller's, not a
        reason to change strategy; so is any other error that does not count against the placement."""
        message = None
        try:
            return self.run(call, request, rung, progress), None, True
        except Exception as exc:
            memory = exc is not call.callback_error and is_out_of_memory(exc)
            if not memory and not self.counts_against(rung, exc, call.callback_error):
                raise
            message = failure_text(exc) if not memory else first_line(exc)
        return None, message, memory

    def _out_of_rungs(self, request: GenerationRequest, fallbacks: list[Fallback]) -> ZImageError:
        """The error when no rung made the image: memory ran short, or a placement failed for another reason."""
        if not any(f.kind == "error" for f in fallbacks):
            return self._out_of_memory(request, fallbacks)
        tried = "\n  ".join(str(f) for f in fallbacks)
        return PlacementFailedError(
            f"No placement could make {request.width}x{request.height} x{request.num_images}. Tried:\n  {tried}\n"
            "A placement that fails for a reason other than memory is a bug: please report this message. "
            "strategy='cpu' or device='cuda:0' avoid the failed placements.",
            tried=fallbacks,
        )

    def _out_of_memory(self, request: GenerationRequest, fallbacks: list[Fallback]) -> NotEnoughMemoryError:
        would_fit = None
        for smaller in smaller_workloads(Workload.of(request), floor=256):
            best = self.plan_for(smaller).best
            if best is not None:
                would_fit = f"{smaller.width}x{smaller.height} with {best.name}"
                break
        tried = "\n  ".join(str(f) for f in fallbacks) or "(nothing: no strategy was predicted to fit)"
        hint = (
            f"It would fit at {would_fit}; pass allow_downscale=True (ZIMAGE_ALLOW_DOWNSCALE=1) to lower the size "
            "automatically, or ask for a smaller image."
            if would_fit
            else "Free GPU memory (other programs), or use a machine with more memory."
        )
        return NotEnoughMemoryError(
            f"Not enough memory for {request.width}x{request.height} x{request.num_images}. Tried:\n  {tried}\n{hint}",
            tried=fallbacks,
            would_fit=would_fit,
        )


def failure_text(exc: BaseException) -> str:
    """An exception's type and first line, for fallbacks and logs."""
    return f"{type(exc).__name__}: {first_line(exc)}"


def _memory_was_short(fallbacks: list[Fallback]) -> bool:
    """Whether a smaller image could help: some rung ran out of memory, or none was even tried."""
    return any(f.kind == "strategy" for f in fallbacks) or not any(f.kind == "error" for f in fallbacks)


def _needs_less(rung: Candidate, failed: Candidate, phase: str) -> bool:
    """A rung worth trying after ``failed`` ran out of memory in ``phase``: it needs less in that phase
    (VAE tiling helps a decode, not a denoise); after a failure to place the weights, less overall."""

    def need(candidate: Candidate) -> int:
        return max(candidate.estimate.by_phase.get(phase, {}).values(), default=candidate.peak_bytes)

    if phase == "place":
        return rung.peak_bytes < failed.peak_bytes
    return need(rung) < need(failed)


def _doing(phase: str) -> str:
    doing = {
        "place": "placing weights",
        "encode": "encoding",
        "encode_image": "encoding the input images",
        "denoise": "denoising",
        "decode": "decoding",
    }
    return doing.get(phase, phase)
