"""The quick hub reachability check before a hub download (issue 16, item 9)."""

from __future__ import annotations

import time

import pytest

from ssn_core import hub
from ssn_core.errors import ModelLoadError

CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


def test_unreachable_hub_is_one_quick_error(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", CLOSED)
    assert hub.hub_endpoint() == CLOSED
    assert hub.reachable(CLOSED, timeout=1.0) is not None
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="cannot reach the Hugging Face hub at http://127.0.0.1:9"):
        hub.check_hub_reachable("no-such-org/no-such-model", timeout=1.0)
    assert time.perf_counter() - started < 3


def test_a_listening_endpoint_is_reachable():
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        assert hub.reachable(f"http://127.0.0.1:{server.getsockname()[1]}", timeout=2.0) is None
    finally:
        server.close()


def test_cached_models_skip_the_check(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", CLOSED)
    monkeypatch.setattr(hub, "in_local_cache", lambda repo_id: True)
    hub.check_hub_reachable("some-org/cached-model", timeout=1.0)  # no error: transformers uses the cache
