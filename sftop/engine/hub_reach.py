"""Is the Hugging Face hub reachable? Asked once per process, answered within a few seconds.

Without a network, huggingface_hub retries each request five times with back-off (about 24 s and
five warning lines per file) before giving up. One short probe of the hub's endpoint tells the
user at once instead, and switches this process to offline mode so that cached models and
datasets still load and no later call waits on the network again.
"""

from __future__ import annotations

import os
import threading
from typing import Any

# Long enough for a slow but working link (one round trip to the endpoint), short enough that a
# black-holed network costs the user seconds, not half a minute.
PROBE_TIMEOUT_S = 4.0

_lock = threading.Lock()
_verdict: dict[str, str | None] = {}


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def unreachable_reason() -> str | None:
    """None when the hub answers (any HTTP status will do); else why it cannot be reached.

    The answer is cached for the process: the network rarely comes back mid-command, and asking
    again would cost the user the timeout again.
    """
    endpoint = hub_endpoint()
    with _lock:
        if endpoint not in _verdict:
            _verdict[endpoint] = _probe(endpoint)
            if _verdict[endpoint] is not None:
                go_offline()
        return _verdict[endpoint]


def _probe(endpoint: str) -> str | None:
    import httpx

    try:
        # trust_env: a machine that reaches the hub through HTTPS_PROXY is online.
        with httpx.Client(timeout=PROBE_TIMEOUT_S, trust_env=True, follow_redirects=False) as client:
            client.head(endpoint)
    except httpx.TimeoutException:
        return f"no answer from {endpoint} within {PROBE_TIMEOUT_S:g} s"
    except (httpx.HTTPError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"{endpoint} cannot be reached ({first})"
    return None


def go_offline() -> None:
    """Put this process (and the trainer it may start) in Hugging Face offline mode: later hub
    calls read the local cache at once instead of retrying the network."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    import sys

    # transformers asks huggingface_hub.constants; datasets copied the flag when it was imported.
    datasets_config: Any = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True


OFFLINE_HINT = (
    "Check the network (or HF_ENDPOINT / HTTPS_PROXY); to work from the local cache only, "
    "set HF_HUB_OFFLINE=1 and sftop will not try the network"
)
