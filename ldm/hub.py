"""The Hugging Face hub, asked the same way by every loader: what is a hub id, is offline mode on, can it be reached.

Without a network the hub libraries retry each request with backoff for half a minute before failing. So every
loader (datasets in ldm.data.sources, text encoders in ldm.text.load_encoder, pipeline models in ldm.models.spec)
asks `reachable()` first and goes offline up front when it says no: whatever the local cache holds still loads,
anything else fails in seconds with a message that names the fix.

`reachable()` opens a TCP connection where the hub libraries would open theirs: to the proxy configured for the
hub's URL (HTTPS_PROXY / https_proxy / ALL_PROXY, unless NO_PROXY exempts the hub's host, read as requests and
httpx read them, through `urllib.request`), otherwise to the hub's own host. It sends nothing, so it answers "a
connection can be made", not "the hub will serve this repository"; the load that follows reports that.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import sys
import urllib.request
from typing import Iterator
from urllib.parse import urlsplit

# "namespace/name", as datasets, models and diffusers repositories are named. Bare names ("gpt2") are legacy ids
# the hub still redirects, but no dataset, CLIP text encoder or Stable Diffusion model we load has one, and
# accepting them would turn a mistyped relative folder ("text-encoder") into a misleading "offline?" error.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# The variables huggingface_hub, datasets and transformers read, with the values they take as "on".
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = ("1", "ON", "YES", "TRUE")
_DEFAULT_PORTS = {"http": 80, "https": 443, "socks4": 1080, "socks4a": 1080, "socks5": 1080, "socks5h": 1080}


def is_hub_id(name: str) -> bool:
    """Whether `name` is spelled like a hub repository id 'namespace/name' (whether it exists is the hub's to say)."""
    return HUB_ID.match(name) is not None


def offline_requested() -> bool:
    """Whether offline mode is asked for: by a variable set now, or in a hub library's already-read flag.

    The libraries read HF_HUB_OFFLINE & co. once, at import: a variable set later (by a launcher, a test) counts
    here all the same.
    """
    if any(os.environ.get(name, "").upper() in _TRUE for name in OFFLINE_ENV):
        return True
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    datasets_config = sys.modules.get("datasets.config")  # only if imported: importing `datasets` takes seconds
    return bool(datasets_config is not None and datasets_config.HF_HUB_OFFLINE)


def reachable(timeout_s: float = 3.0) -> bool:
    """False in offline mode, or when no TCP connection to the hub (or its proxy) opens within `timeout_s`."""
    if offline_requested():
        return False
    from huggingface_hub import constants

    try:
        with socket.create_connection(connect_address(constants.ENDPOINT), timeout=timeout_s):
            return True
    except OSError:  # refused, timed out, unknown host, no route
        return False
    except ValueError:  # a malformed proxy URL ("http://proxy:port"): the hub libraries could not connect either
        return False


def connect_address(url: str) -> tuple[str, int]:
    """(host, port) a hub client opens a connection to for `url`: its proxy's, or, without one, the URL's own."""
    parts = urlsplit(url)
    host, scheme = parts.hostname or "", parts.scheme or "https"
    proxies = urllib.request.getproxies()
    proxy = None if _bypasses_proxy(host, proxies) else _proxy_for(scheme, host, proxies)
    if proxy is not None:
        # requests and httpx take a proxy given without a scheme ("proxy:3128") as an http:// one
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, scheme = parts.hostname or "", parts.scheme
    return host, parts.port or _DEFAULT_PORTS.get(scheme, 443)


def _bypasses_proxy(host: str, proxies: dict[str, str]) -> bool:
    if urllib.request.proxy_bypass(host):  # NO_PROXY names, domain suffixes, "*"
        return True
    # requests and httpx also take IP networks in NO_PROXY ("10.0.0.0/8"), which urllib does not
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    for entry in proxies.get("no", "").split(","):
        with contextlib.suppress(ValueError):
            if address in ipaddress.ip_network(entry.strip(), strict=False):
                return True
    return False


def _proxy_for(scheme: str, host: str, proxies: dict[str, str]) -> str | None:
    # requests' order (requests.utils.select_proxy): the most specific key wins
    for key in (f"{scheme}://{host}", scheme, f"all://{host}", "all"):
        if proxies.get(key):
            return proxies[key]
    return None


@contextlib.contextmanager
def offline_mode(offline: bool) -> Iterator[None]:
    """Force offline mode in `huggingface_hub` (and `datasets`, if imported) for one call when `offline` is true.

    Both libraries read HF_HUB_OFFLINE / HF_DATASETS_OFFLINE once, at import: an environment variable set later (by
    a test, a launcher) or our own reachability verdict would otherwise be ignored.
    """
    if not offline:
        yield
        return
    from huggingface_hub import constants

    datasets_config = sys.modules.get("datasets.config")
    saved_hub = constants.HF_HUB_OFFLINE
    saved_datasets = (
        (datasets_config.HF_HUB_OFFLINE, datasets_config.HF_DATASETS_OFFLINE) if datasets_config is not None else None
    )
    constants.HF_HUB_OFFLINE = True
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_hub
        if datasets_config is not None and saved_datasets is not None:
            datasets_config.HF_HUB_OFFLINE, datasets_config.HF_DATASETS_OFFLINE = saved_datasets
