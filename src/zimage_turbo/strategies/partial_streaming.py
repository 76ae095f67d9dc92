"""Streaming only some blocks of a module: diffusers' group offloading, restricted to the blocks we name.

``apply_group_offloading`` groups every block of every block list of the module it is given. To stream a subset,
we give it a stand-in module whose only child is a list of the chosen blocks: diffusers then makes one group
and one hook per chosen block (on the block itself), and none for the others, which stay where they are with no
hook (so that they can be compiled). diffusers learns the order in which to prefetch by tracing the first
forward from a hook on the module's own group; the stand-in has none, so we link the groups ourselves, in
execution order, the way that trace does: each streamed block's hook starts copying the next streamed block when
it starts computing, and a hook on the module (diffusers' own hook class, with an empty group or one that moves
the module's non-block weights through their homes) starts the first at the start of each call. Everything is
diffusers' code but the linking; :func:`~zimage_turbo.strategies.streaming.unstream` removes it all.

With a ``lookahead`` above 1 the copies run further ahead. diffusers then keeps track of the blocks' use across
streams (``record_stream``) instead of waiting for each streamed block's compute, and a hook of ours on each
streamed block (:class:`Pacer`) keeps the host from running more than ``lookahead - 1`` streamed blocks ahead of
the GPU, which bounds the streamed blocks held on the GPU at ``lookahead + 1``: unbounded, the host would queue a
whole pass of copies while the GPU computes, each holding its block's memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from ..execution import on_device
from ..host import module_tensors
from ..quiet_imports import quiet_imports
from .streaming import _HOOK_NAMES, _move_through_homes, other_tensors

__all__ = ["Pacer", "install_pacing", "link_prefetch", "stream_blocks"]


def stream_blocks(
    module: torch.nn.Module,
    blocks: Sequence[torch.nn.Module],
    homes: Any,
    device: torch.device,
    *,
    others_resident: bool,
    record_stream: bool = False,
    lookahead: int = 1,
) -> None:
    """Stream ``blocks`` (given in execution order) of ``module`` onto ``device`` from their pinned homes, each
    copied while the streamed block before it computes (``lookahead`` 1), or up to ``lookahead`` streamed blocks
    ahead of the one computing (on CUDA; see the module's docstring); nothing else of ``module`` gets a hook.

    The weights outside every block list (embeddings, norms) stay where they are when ``others_resident``;
    otherwise they are homed and copied from their homes at each call of ``module``, then pointed back (as
    :func:`~zimage_turbo.strategies.streaming.stream` does). Without ``blocks``, nothing is installed."""
    if not blocks:
        return
    with quiet_imports():
        from diffusers.hooks import HookRegistry, apply_group_offloading
        from diffusers.hooks.group_offloading import GroupOffloadingHook, ModuleGroup

    host = torch.device("cpu")
    with on_device(device):  # diffusers makes its transfer stream on the current CUDA device
        homes.adopt([tensor for block in blocks for tensor in module_tensors(block)])
        others = [] if others_resident else other_tensors(module)
        homes.adopt(others)  # homed before any hook is installed: the first offload finds them at home
        use_stream = device.type == "cuda"
        stand_in = torch.nn.Module()
        stand_in.blocks = torch.nn.ModuleList(blocks)  # the blocks keep their places in ``module`` too
        apply_group_offloading(
            stand_in,
            onload_device=device,
            offload_device=host,
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=use_stream,
            record_stream=(record_stream or lookahead > 1) and use_stream,
            low_cpu_mem_usage=False,
            exclude_kwargs=getattr(module, "_skip_keys", None),  # what diffusers would read from the module itself
        )
        hooks = [HookRegistry.check_if_exists_or_initialize(block).get_hook(_HOOK_NAMES[0]) for block in blocks]
        # The module's own group: its non-block weights when they are not resident, else nothing; its hook starts
        # the first block's copy. A diffusers group and hook, so that unstream() finds and removes it like theirs.
        top = ModuleGroup(
            modules=[],
            offload_device=host,
            onload_device=device,
            offload_leader=module,
            onload_leader=module,
            non_blocking=False,
            stream=None,
            onload_self=True,
        )
        if others:
            _move_through_homes(top, others, homes, device)
        top_hook = GroupOffloadingHook(top, config=hooks[0].config)
        HookRegistry.check_if_exists_or_initialize(module).register_hook(top_hook, _HOOK_NAMES[0])
        if use_stream:
            link_prefetch(top_hook, hooks)
            if lookahead > 1:
                install_pacing(blocks, lookahead, lambda: _mark_compute_stream(device))


def link_prefetch(first: Any, hooks: Sequence[Any]) -> None:
    """Make ``first`` (the module's hook) start copying the first block of ``hooks``, and each block's hook the
    next one's, as diffusers' lazy prefetch hook does after tracing a forward: a group copied by the hook before
    it does not copy itself (``onload_self``), and waits for that copy before its block computes."""
    previous = first
    for hook in hooks:
        previous.next_group = hook.group
        hook.group.onload_self = False
        previous = hook


class _Mark(Protocol):
    """A point in the compute stream's work (a recorded CUDA event): the host can wait until the GPU gets there."""

    def synchronize(self) -> None: ...


def _mark_compute_stream(device: torch.device) -> torch.cuda.Event:
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(torch.cuda.current_stream(device))  # the blocks' kernels run on that device's current stream
    return event


class Pacer:
    """Keeps the host at most ``lookahead - 1`` streamed blocks ahead of the GPU: as each streamed block is about
    to run, it marks the compute stream (an event) and waits until the GPU has started the streamed block
    ``lookahead - 1`` before this one. The copy this block's hook then starts (of the next streamed block)
    overlaps the compute of the blocks since that one."""

    def __init__(self, lookahead: int, mark: Callable[[], _Mark]) -> None:
        self._lead = max(lookahead - 1, 1)
        self._mark = mark
        self._marks: deque[_Mark] = deque()

    def arrived(self) -> None:
        self._marks.append(self._mark())
        if len(self._marks) > self._lead:
            self._marks.popleft().synchronize()


def install_pacing(blocks: Sequence[torch.nn.Module], lookahead: int, mark: Callable[[], _Mark]) -> Pacer:
    """One :class:`Pacer` for ``blocks`` (streamed, in execution order), its hook on each, outside diffusers' own
    (registered after them, so it runs first); removed with the others by
    :func:`~zimage_turbo.strategies.streaming.unstream`. ``mark()`` records a point in the compute stream."""
    with quiet_imports():
        from diffusers.hooks import HookRegistry, ModelHook

    pacer = Pacer(lookahead, mark)

    class PaceHook(ModelHook):  # type: ignore[misc]  # diffusers is untyped
        def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            pacer.arrived()
            return args, kwargs

    for block in blocks:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(PaceHook(), _HOOK_NAMES[3])
    return pacer
