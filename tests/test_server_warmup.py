"""`ouroboros serve` warms up before its first request: /health says so, requests wait, and the
first request finds the fast path's graphs compiled (it pays no compiling)."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from server_helpers import MODEL, TOKENIZER, client, decode, hf_greedy, make_pair, metrics, serving  # noqa: E402

import ouroboros.static_runner as static_runner  # noqa: E402
from ouroboros.server import create_app  # noqa: E402
from ouroboros.server import worker as server_worker  # noqa: E402


@pytest.fixture
def calls(monkeypatch):
    """Every generate() the worker makes: (method, stats)."""
    seen = []
    real = server_worker.generate

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((kwargs["method"], out.stats))
        return out

    monkeypatch.setattr(server_worker, "generate", spy)
    return seen


def test_health_says_warming_up_and_requests_wait_for_it(monkeypatch, calls):
    gate, ready = threading.Event(), []
    real = server_worker.Worker._warm_up

    def held(self):
        gate.wait(30)
        real(self)

    monkeypatch.setattr(server_worker.Worker, "_warm_up", held)
    target, draft = make_pair()
    app = create_app(target, draft, TOKENIZER, model_name=MODEL, method="auto", on_ready=ready.append)
    with serving(app) as base:
        health = httpx.get(base + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "warming up"
        assert health.headers["Retry-After"]
        answer = []
        request = threading.Thread(target=lambda: answer.append(client(base).completions.create(
            model=MODEL, prompt="Hello", max_tokens=12, temperature=0)))
        request.start()
        request.join(0.5)
        assert not answer and calls == []  # queued behind the warm-up
        gate.set()
        request.join(60)
        assert httpx.get(base + "/health", timeout=10).json() == {"status": "ok"}
    ids = TOKENIZER("Hello", add_special_tokens=False).input_ids
    assert answer[0].choices[0].text == decode(hf_greedy(target, ids, 12))
    assert len(ready) == 1 and ready[0] > 0
    assert [method for method, _ in calls] == ["ouroboros", "auto", "auto"]  # warm-up: the draft, then the method


def test_the_first_request_pays_no_compiling(monkeypatch, calls):
    """Compiling is replaced by an eager call (a real compile takes long): what is tested is that the
    warm-up's runners leave their buffers, and the graphs made for them, to the first request."""
    monkeypatch.setattr(static_runner, "_call_compiled", lambda model, device, inputs, dynamic=None: model(**inputs))
    target, draft = make_pair(seed=3)
    with serving(create_app(target, draft, TOKENIZER, model_name=MODEL, method="ouroboros", fast=True)) as base:
        out = client(base).completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0)
        counters = metrics(base)
    (_, warm_stats), (_, first) = calls
    assert warm_stats.compile_seconds > 0 and first.compile_seconds == 0
    assert not any(record.compiled for record in first.forward_log)
    assert counters["ouroboros_generated_tokens_total"] == first.new_tokens  # the warm-up counts in no metric
    ids = TOKENIZER("Once upon a time", add_special_tokens=False).input_ids
    assert out.choices[0].text == decode(hf_greedy(target, ids, 16))


def test_without_warm_up_the_server_is_ready_at_once(calls):
    target, draft = make_pair()
    with serving(create_app(target, draft, TOKENIZER, model_name=MODEL, method="ouroboros", warm_up=False)) as base:
        assert httpx.get(base + "/health", timeout=10).json() == {"status": "ok"}
    assert calls == []
