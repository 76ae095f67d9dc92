"""Whether a hub can be reached at all, asked in milliseconds before its client is: a machine without a network
(or without name resolution) would otherwise wait for each client's retries, about 20 seconds for ModelScope's,
before the same clear error.

Only a failed name lookup of the hub's host counts, and only where no proxy is configured (a proxy resolves
names itself): a host that resolves but does not answer is left to the client, which reports it as it does.
The host is that of the endpoint the client will use (``HF_ENDPOINT``, ``MODELSCOPE_ENDPOINT`` or the older
``MODELSCOPE_DOMAIN``, else the public hubs).
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

__all__ = ["hub_host", "unreachable"]

_DEFAULT_ENDPOINTS = {"huggingface": "https://huggingface.co", "modelscope": "https://modelscope.cn"}
_ENDPOINT_VARIABLES = {"huggingface": ("HF_ENDPOINT",), "modelscope": ("MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN")}
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_host(hub: str) -> str:
    """The host name the client of ``hub`` ("huggingface" or "modelscope") will connect to."""
    endpoint = next(
        (os.environ[name].strip() for name in _ENDPOINT_VARIABLES[hub] if os.environ.get(name, "").strip()),
        _DEFAULT_ENDPOINTS[hub],
    )
    if "://" not in endpoint:  # MODELSCOPE_DOMAIN is a bare host name
        endpoint = "https://" + endpoint
    return urlsplit(endpoint).hostname or ""


def unreachable(hub: str) -> str:
    """Why ``hub`` certainly cannot be reached now ("" when it may be): its host name does not resolve and no
    proxy is configured."""
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return ""
    host = hub_host(hub)
    if not host:
        return ""
    try:
        socket.getaddrinfo(host, 443)
    except socket.gaierror as exc:
        return f"cannot resolve {host} ({exc.strerror or exc}): no network, or no name service"
    except OSError:
        return ""  # anything else: let the client try and say what happened
    return ""
