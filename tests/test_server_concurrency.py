"""Many clients at once, clients that leave, and a bounded queue: every answer stays exact,
a disconnect stops its generation and frees its place, a full queue answers 503 at once."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from server_helpers import (  # noqa: E402
    CHAT,
    MODEL,
    OK,
    PROMPTS,
    TOKENIZER,
    client,
    decode,
    hf_greedy,
    make_pair,
    metrics,
    serving,
    wait_for,
)

from ouroboros.server import create_app  # noqa: E402
from ouroboros.server import worker as server_worker  # noqa: E402


def test_sixteen_concurrent_clients(server_url, server_pair):
    expected = {p: decode(hf_greedy(server_pair[0], TOKENIZER(p).input_ids, 8)) for p in PROMPTS}

    def run(i: int) -> list[tuple[str, str]]:
        c = client(server_url, timeout=90)
        answers = []
        for j in range(4):
            prompt = PROMPTS[(i + j) % len(PROMPTS)]
            if (i + j) % 2:
                text = "".join(ch.choices[0].text
                               for ch in c.completions.create(model=MODEL, prompt=prompt, max_tokens=8, stream=True))
            else:
                text = c.completions.create(model=MODEL, prompt=prompt, max_tokens=8).choices[0].text
            answers.append((prompt, text))
        return answers

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(run, i) for i in range(16)]
        answers = [answer for f in futures for answer in f.result(timeout=120)]
    assert len(answers) == 64
    assert all(text == expected[prompt] for prompt, text in answers)
    assert httpx.get(server_url + "/health").status_code == 200
    m = metrics(server_url)
    assert m["ouroboros_queue_depth"] == 0 and m["ouroboros_requests_running"] == 0


@pytest.fixture(scope="module")
def endless():
    """A server whose target never emits EOS, for generations long enough to walk away from."""
    target, draft = make_pair(eos=None, arch="llama", seed=3, context=4096)
    with serving(create_app(target, draft, TOKENIZER, model_name=MODEL)) as url:
        yield url


def open_stream(stack: contextlib.ExitStack, url: str, max_tokens: int):
    response = stack.enter_context(httpx.stream(
        "POST", url + "/v1/completions", timeout=30,
        json={"model": MODEL, "prompt": "Hello", "max_tokens": max_tokens, "stream": True}))
    assert response.status_code == 200
    return response


def test_disconnects_stop_generation_and_free_the_queue(endless):
    before = metrics(endless)
    aborted = 'ouroboros_requests_finished_total{reason="aborted"}'
    with contextlib.ExitStack() as running:
        first = open_stream(running, endless, 4000)
        lines = first.iter_lines()
        assert next(line for line in lines if line).startswith("data: {")  # generating
        with contextlib.ExitStack() as queued:
            open_stream(queued, endless, 4000)
            wait_for(lambda: metrics(endless)["ouroboros_queue_depth"] == 1)
        # the queued client left: its place is freed while the first one still runs
        wait_for(lambda: metrics(endless)[aborted] == before[aborted] + 1)
        m = metrics(endless)
        assert m["ouroboros_queue_depth"] == 0 and m["ouroboros_requests_running"] == 1
    wait_for(lambda: metrics(endless)[aborted] == before[aborted] + 2)
    m = metrics(endless)
    assert m["ouroboros_requests_running"] == 0
    assert m["ouroboros_generated_tokens_total"] - before["ouroboros_generated_tokens_total"] < 4000

    response = client(endless).completions.create(model=MODEL, prompt="Hello", max_tokens=6)
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 6


def test_non_streaming_client_that_times_out_is_dropped(endless):
    before = metrics(endless)
    aborted = 'ouroboros_requests_finished_total{reason="aborted"}'
    with pytest.raises(httpx.TimeoutException):
        httpx.post(endless + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4000},
                   timeout=0.5)
    wait_for(lambda: metrics(endless)[aborted] == before[aborted] + 1)
    assert metrics(endless)["ouroboros_requests_running"] == 0


def test_a_full_queue_answers_503_with_retry_after(server_pair, monkeypatch):
    """One request runs (held at a gate), two wait (max_queue=2): the next is refused at once, streamed
    or not, and the held and waiting ones still complete once the gate opens."""
    target, draft = server_pair
    gate, running = threading.Event(), threading.Event()
    real_generate = server_worker.generate

    def gated(*args, **kwargs):
        running.set()
        assert gate.wait(60), "the test never opened the gate"
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(server_worker, "generate", gated)
    with serving(create_app(target, draft, TOKENIZER, model_name=MODEL, max_queue=2, warm_up=False)) as url, \
            ThreadPoolExecutor(3) as pool:
        def post(max_tokens: int):
            return pool.submit(httpx.post, url + "/v1/completions", json={**OK, "max_tokens": max_tokens}, timeout=60)

        accepted = [post(3)]
        assert running.wait(30)
        accepted += [post(4), post(5)]
        wait_for(lambda: metrics(url)["ouroboros_queue_depth"] == 2)
        for body in ({**OK, "max_tokens": 6}, {**OK, "max_tokens": 6, "stream": True}):
            refused = httpx.post(url + "/v1/completions", json=body, timeout=30)
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["retry-after"]) >= 1
            error = refused.json()["error"]
            assert error["code"] == "queue_full" and error["type"] == "server_error" and "--max-queue 2" in error[
                "message"]
        with pytest.raises(openai.InternalServerError):
            client(url).chat.completions.create(**CHAT)
        gate.set()
        responses = [f.result(timeout=60) for f in accepted]
    assert [r.status_code for r in responses] == [200, 200, 200]
    ids = TOKENIZER(OK["prompt"]).input_ids
    assert [r.json()["usage"]["completion_tokens"] for r in responses] == [
        len(hf_greedy(target, ids, n)) for n in (3, 4, 5)]


@pytest.mark.parametrize("max_queue", [-1, 1.5, True])
def test_max_queue_must_be_a_count(server_pair, max_queue):
    with pytest.raises(ValueError, match="max_queue"):
        create_app(*server_pair, TOKENIZER, max_queue=max_queue)
