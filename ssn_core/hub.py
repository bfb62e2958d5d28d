"""Is the Hugging Face hub reachable? One quick check before a hub download, instead of ~25 s of retries.

Without ``HF_HUB_OFFLINE``, an unknown hub id on a machine without a network made transformers retry for
about 25 seconds before failing. `check_hub_reachable` opens one TCP connection to the hub endpoint
(``HF_ENDPOINT`` or huggingface.co:443) with a short timeout first; models already in the local hub cache
skip the check (transformers falls back to the cache when the hub cannot be reached).
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse

from ssn_core.errors import ModelLoadError

DEFAULT_TIMEOUT_S = 3.0


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT or "https://huggingface.co").rstrip("/")


def in_local_cache(repo_id: str) -> bool:
    """True when the hub cache already holds this repository's config.json."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an invalid repo id, an unreadable cache: not cached
        return False


def reachable(endpoint: str, timeout: float = DEFAULT_TIMEOUT_S) -> str | None:
    """None when a TCP connection to the endpoint opens within ``timeout`` s, else why not (DNS included)."""
    parsed = urllib.parse.urlparse(endpoint)
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(None)
        except OSError as exc:
            outcome.append(str(exc) or type(exc).__name__)

    worker = threading.Thread(target=attempt, name="ssn-hub-check", daemon=True)  # DNS has no timeout of its own
    worker.start()
    worker.join(timeout + 0.5)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def check_hub_reachable(repo_id: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """Raise `ModelLoadError` at once when ``repo_id`` would have to be downloaded and the hub cannot be reached."""
    if in_local_cache(repo_id):
        return
    endpoint = hub_endpoint()
    why = reachable(endpoint, timeout)
    if why is not None:
        raise ModelLoadError(
            f"cannot reach the Hugging Face hub at {endpoint} to download {repo_id!r} ({why}). Check the network "
            "or the id; offline, load a local model directory, a .gguf file or the starter model "
            "(or set HF_HUB_OFFLINE=1 to use models already in the hub cache)."
        )
