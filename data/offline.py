"""Whether the Hugging Face Hub can be reached, decided once per process and fast.

Without network the Hub clients retry each request with back-off (tens of seconds per file,
warnings repeated) before they fail. ``offline_reason`` answers first: the offline variables
(``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``, ``TRANSFORMERS_OFFLINE``) or one TCP connection to
the Hub endpoint (``HF_ENDPOINT``) with a ``PROBE_TIMEOUT_S`` limit. Callers then read only
local files and caches, and a miss is one message saying what is missing and how to provide it.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
PROBE_TIMEOUT_S = 3.0
DEFAULT_ENDPOINT = "https://huggingface.co"


def offline_by_env() -> str | None:
    """The first offline variable set to a true value, or None."""
    for name in OFFLINE_ENV_VARS:
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return name
    return None


@functools.lru_cache(maxsize=4)
def _probe(endpoint: str, timeout: float) -> str | None:
    url = urlparse(endpoint)
    host = url.hostname or endpoint
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as error:
        return f"the Hugging Face Hub ({host}:{port}) is unreachable ({type(error).__name__}: {error})"


def offline_reason() -> str | None:
    """Why the Hub must not be asked (an offline variable, or an unreachable endpoint), or None
    when it can be. The probe runs once per process and endpoint."""
    variable = offline_by_env()
    if variable is not None:
        return f"{variable} is set"
    return _probe(os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT), PROBE_TIMEOUT_S)
