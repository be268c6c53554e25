"""The Hugging Face hub, offline: one quick look, then no retries and no noise.

Asked for a file the local cache lacks, huggingface_hub tries the network with back-off
(measured here without DNS: 50 s and a dozen "Retrying in 8s" lines for one timm model)
before it gives up. featcache looks once whether the hub's host answers (a TCP connect,
3 s at most) or whether `HF_HUB_OFFLINE` is set; when it is out of reach, hub calls run in
huggingface_hub's own offline mode, so files already cached still load and missing ones
fail at once, and featcache says so in one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

CONNECT_TIMEOUT_S = 3.0
_TRUE = {"1", "on", "yes", "true"}
_reachability: dict[str, str | None] = {}


def endpoint() -> str:
    """The hub's base URL (huggingface_hub's, which honours HF_ENDPOINT)."""
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT)
    except Exception:  # an odd install: the public hub
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def offline_reason() -> str | None:
    """Why the hub cannot be used now (offline mode asked for, or its host out of reach),
    or None when it answers. The network is asked once per process and endpoint."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set"
    url = endpoint()
    if url not in _reachability:
        _reachability[url] = _probe(url)
    return _reachability[url]


def _probe(url: str) -> str | None:
    parsed = urlparse(url)
    host = parsed.hostname or url
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        return f"{host} cannot be reached ({why})"


@contextlib.contextmanager
def hub_access() -> Iterator[str | None]:
    """Run hub calls online when the hub answers; otherwise in huggingface_hub's offline
    mode with its retry chatter silenced. Yields the offline reason (None: online)."""
    reason = offline_reason()
    if reason is None:
        yield None
        return
    try:
        from huggingface_hub import constants, utils
    except Exception:  # no huggingface_hub: nothing to switch
        yield reason
        return
    # huggingface_hub < 1 caches sessions made in the old mode; later versions check the
    # mode on every request and have no such function
    reset_sessions = getattr(utils, "reset_sessions", lambda: None)
    before = constants.HF_HUB_OFFLINE
    quiet = [logging.getLogger(name) for name in ("huggingface_hub", "timm", "open_clip")]
    levels = [log.level for log in quiet]
    constants.HF_HUB_OFFLINE = True
    reset_sessions()  # sessions are cached with the mode they were made in
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        yield reason
    finally:
        constants.HF_HUB_OFFLINE = before
        reset_sessions()
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)
