"""Which replicas a :class:`~zimage_turbo.pool.GeneratorPool` has: the devices it was given, or for
``devices="all"`` those the planner picks.

With ``"all"``, every visible GPU gets a replica if it can run the model alone (fastest first, as long as host RAM
holds what the streaming ones pin), unless one model spread over every GPU is predicted about as fast as those
replicas together; without CUDA GPUs there is one replica on the default device. Each replica is a
:class:`~zimage_turbo.generator.Generator`, made by the pool (:data:`MakeReplica`), restricted to its device.
"""

from __future__ import annotations

import collections.abc
import logging
from collections.abc import Callable, Sequence

import torch

from .errors import InvalidRequestError
from .generator import Generator
from .planner import HOST_RESERVE_BYTES, Candidate
from .strategies import MultiGPUDispatch

__all__ = ["SPLIT_MARGIN", "MakeReplica", "device_of", "make_replicas", "replica_name", "wanted_devices"]

# The pool's records keep the logger name they have always had (users set its level).
logger = logging.getLogger("zimage_turbo.pool")

# "all" spreads one model over every card rather than making a replica per card unless the replicas together
# are predicted this much faster: near a tie, one model needs no host RAM for streaming and answers sooner.
SPLIT_MARGIN = 1.1

#: makes a pool's replica restricted to a device (None: not restricted, every GPU)
MakeReplica = Callable[[torch.device | None], Generator]


def wanted_devices(devices: str | Sequence[str | torch.device]) -> list[torch.device] | None:
    """The ``devices`` argument of a pool, checked: the list of devices, or None for ``"all"``."""
    if isinstance(devices, str):
        if devices != "all":
            raise InvalidRequestError(f"devices must be 'all' or a list like ['cuda:0', 'cuda:1'], got {devices!r}")
        return None
    if not isinstance(devices, collections.abc.Sequence):
        raise InvalidRequestError(f"devices must be 'all' or a list like ['cuda:0', 'cuda:1'], got {devices!r}")
    wanted = [device_of(d) for d in devices]
    if not wanted:
        raise InvalidRequestError("devices is empty: give at least one device, or 'all'")
    return wanted


def make_replicas(make: MakeReplica, strategy: str, wanted: list[torch.device] | None) -> list[Generator]:
    """The replicas of a pool whose replicas run ``strategy`` (or ``"auto"``): one per device of ``wanted``, or
    for ``"all"`` (None) those described in the module's description."""
    if wanted is not None:
        return [make(device) for device in wanted]
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        logger.info("no CUDA GPU: one replica on the default device")
        return [make(None)]
    chosen, refused = _replicas_per_card(make, strategy)
    for line in refused:
        logger.info("no replica on %s", line)
    if strategy != "auto":
        if chosen:
            return [replica for replica, _ in chosen]
        logger.warning("%s fits on no single GPU (%s); one replica over every GPU", strategy, refused)
        return [make(None)]
    per_card = sum(1 / best.seconds for _, best in chosen)
    whole = make(None)
    best = whole.plan().best if torch.cuda.device_count() > 1 else None
    # One model over every card, when it is about as fast as the replicas together: it needs no host RAM for
    # streamed weights, and each image comes sooner.
    if best is not None and isinstance(best.strategy, MultiGPUDispatch) and per_card < SPLIT_MARGIN / best.seconds:
        logger.info(
            "one replica over every GPU (%s, %.2f images/s predicted) rather than one per card (%.2f)",
            best.name,
            1 / best.seconds,
            per_card,
        )
        return [whole]
    if not chosen:
        logger.warning("no single GPU can run the model (%s); one replica over every GPU", "; ".join(refused))
        return [whole]
    return [replica for replica, _ in chosen]


def _replicas_per_card(make: MakeReplica, strategy: str) -> tuple[list[tuple[Generator, Candidate]], list[str]]:
    """A replica for every card that can run the model alone (fastest first), as long as host RAM holds
    what they stream from it; and why each other card has none."""
    options: list[tuple[Generator, Candidate]] = []
    refused: list[str] = []
    host_available = 0
    for index in range(torch.cuda.device_count()):
        replica = make(torch.device("cuda", index))
        ranked = replica.plan()
        host_available = ranked.hardware.host_available_bytes
        fitting = [c for c in ranked.fitting if strategy in ("auto", c.strategy.name)]
        if fitting:
            options.append((replica, fitting[0]))
        else:
            refused.append(f"cuda:{index}: {'nothing' if strategy == 'auto' else strategy} fits")
    options.sort(key=lambda option: option[1].seconds)
    host_left = host_available - HOST_RESERVE_BYTES
    chosen = []
    for replica, best in options:
        if best.estimate.host_bytes and best.estimate.host_bytes > host_left:
            refused.append(
                f"{replica_name(replica)}: {best.name} would pin {best.estimate.host_bytes / 2**30:.1f} GiB of host "
                f"RAM, {max(host_left, 0) / 2**30:.1f} GiB left after the other replicas"
            )
            continue
        host_left -= best.estimate.host_bytes
        chosen.append((replica, best))
    return chosen, refused


def device_of(value: str | torch.device) -> torch.device:
    """``value`` as a device; a CUDA device without an index is ``cuda:0``."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise InvalidRequestError(f"not a device: {value!r} (use e.g. 'cuda:0' or 'cpu')") from None
    return torch.device("cuda", device.index or 0) if device.type == "cuda" else device


def replica_name(replica: Generator) -> str:
    """The device a replica is restricted to, as text; ``"default"`` when it is not restricted."""
    return str(replica.device) if replica.device is not None else "default"
