"""`ouroboros serve` against live uvicorn servers on 127.0.0.1, driven by the real `openai` client and httpx."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import torch  # noqa: E402
from tiny_models import perturbed, save_tiny_pair, tiny_model, tiny_tokenizer  # noqa: E402

from ouroboros import InvalidArgumentError, PhrasePool  # noqa: E402
from ouroboros.cli import main as cli_main  # noqa: E402
from ouroboros.server import TextTracker, create_app, tokenizer_fingerprint  # noqa: E402
from ouroboros.server import app as server_app  # noqa: E402
from ouroboros.server import worker as server_worker  # noqa: E402

MODEL = "tiny"
TOKENIZER = tiny_tokenizer()
EOS = TOKENIZER.convert_tokens_to_ids("<|im_end|>")
PROMPTS = ["Hello", "The quick brown fox", "def add(a, b):", "Once upon a time", "import torch", "SELECT * FROM",
           "1, 2, 3,", "Dear Sir,"]


@contextlib.contextmanager
def serving(app):
    """Run `app` with uvicorn in a thread on a free port of 127.0.0.1; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


def client(base: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                         timeout=kwargs.pop("timeout", 60), **kwargs)


def make_pair(eos=EOS, arch="qwen2", seed=0, context=1024):
    target = tiny_model(arch, seed=seed, vocab=len(TOKENIZER), eos_token_id=eos, hidden=64, context=context)
    return target, perturbed(target, scale=0.05, seed=seed + 1)


def hf_greedy(target, ids: list[int], max_new_tokens: int) -> list[int]:
    """The target's own greedy continuation (transformers' generate), EOS included if reached."""
    with torch.inference_mode():
        out = target.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=EOS)
    return out[0, len(ids):].tolist()


def decode(ids: list[int]) -> str:
    return TOKENIZER.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def chat_ids(messages) -> list[int]:
    text = TOKENIZER.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return TOKENIZER(text, add_special_tokens=False).input_ids


def metrics(base: str, **headers) -> dict[str, float]:
    response = httpx.get(base + "/metrics", headers=headers, timeout=10)
    assert response.status_code == 200
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in response.text.splitlines() if line and not line.startswith("#")}


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pair():
    return make_pair()


@pytest.fixture(scope="module")
def base(pair):
    target, draft = pair
    with serving(create_app(target, draft, TOKENIZER, model_name=MODEL)) as url:
        yield url


# --- the OpenAI client: completions and chat, streamed and not --------------------------------------------

@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_completion_matches_target_greedy_streamed_or_not(base, pair, prompt):
    ids = TOKENIZER(prompt).input_ids
    new = hf_greedy(pair[0], ids, 48)  # "Hello" reaches EOS within 48 tokens, the others do not
    c = client(base)
    response = c.completions.create(model=MODEL, prompt=prompt, max_tokens=48, temperature=0)
    choice = response.choices[0]
    assert choice.text == decode(new) and "<|im_end|>" not in choice.text
    assert choice.finish_reason == ("stop" if new[-1] == EOS else "length")
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == (
        len(ids), len(new), len(ids) + len(new))
    assert response.model == MODEL and response.object == "text_completion"

    chunks = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=48, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == choice.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(new)


def test_chat_matches_target_greedy_streamed_or_not(base, pair):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    ids = chat_ids(messages)
    new = hf_greedy(pair[0], ids, 30)
    c = client(base)
    response = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=30)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == decode(new)
    assert response.choices[0].finish_reason == ("stop" if new[-1] == EOS else "length")
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(ids), len(new))

    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=30, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == response.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == response.choices[0].finish_reason
    assert all(ch.id == chunks[0].id for ch in chunks)


def test_stream_is_server_sent_events_ending_with_done(base):
    with httpx.stream("POST", base + "/v1/completions", timeout=30,
                      json={"model": MODEL, "prompt": "Hello", "max_tokens": 5, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_models_health_and_metrics(base):
    models = client(base).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    m = metrics(base)
    for name in ("ouroboros_generated_tokens_total", "ouroboros_tokens_per_second", "ouroboros_mean_accepted_tokens",
                 "ouroboros_queue_depth", "ouroboros_pool_phrases", 'ouroboros_requests_total{endpoint="completions"}'):
        assert name in m


def test_sampling_with_a_seed_is_reproducible(base):
    c = client(base)
    kwargs = dict(model=MODEL, prompt="Hello", max_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    first, second = (c.completions.create(**kwargs).choices[0].text for _ in range(2))
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(**kwargs, stream=True))
    assert first == second == streamed  # same seed, same sample


# --- stop strings ------------------------------------------------------------------------------------------

def stop_case(target, prompt: str) -> tuple[str, str]:
    """A 3-character stop string from the middle of the greedy output, and the text before it."""
    text = decode(hf_greedy(target, TOKENIZER(prompt).input_ids, 40))
    for start in range(len(text) // 3, len(text) - 3):
        stop = text[start:start + 3]
        if "\ufffd" not in stop and len(stop.encode()) >= 3:  # spans at least 3 byte tokens
            return stop, text[:text.find(stop)]
    pytest.fail(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_stop_strings_across_tokens_are_not_leaked(base, pair, prompt):
    stop, before = stop_case(pair[0], prompt)
    c = client(base)
    response = c.completions.create(model=MODEL, prompt=prompt, max_tokens=40, stop=["\x00never\x00", stop])
    assert response.choices[0].text == before
    assert response.choices[0].finish_reason == "stop"
    chunks = [ch.choices[0].text for ch in c.completions.create(model=MODEL, prompt=prompt, max_tokens=40,
                                                                 stop=stop, stream=True)]
    assert "".join(chunks) == before
    assert not any(stop in chunk for chunk in chunks)


def test_text_tracker_holds_back_stop_prefixes_and_half_characters():
    sent = []
    tracker = TextTracker(decode, ["abc"], sent.append)
    tracker.put(torch.tensor([[1, 2]]))  # the prompt: ignored
    sizes = []
    for piece in ["x", "a", "b", "d", "é", "a", "b", "c", "z"]:
        for token in TOKENIZER(piece).input_ids:  # one token per byte: "é" is two
            tracker.put(torch.tensor([token]))
            sizes.append(len(sent))
    tracker.finish()
    assert sent == ["x", "abd", "é"] and tracker.text == "xabdé"
    assert tracker.stopped
    assert sizes == [1, 1, 1, 2, 2, 3, 3, 3, 3, 3]  # "a", "ab" and half of "é" were held back


# --- concurrency -------------------------------------------------------------------------------------------

def test_sixteen_concurrent_clients(base, pair):
    expected = {p: decode(hf_greedy(pair[0], TOKENIZER(p).input_ids, 8)) for p in PROMPTS}

    def run(i: int) -> list[tuple[str, str]]:
        c = client(base, timeout=90)
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
    assert httpx.get(base + "/health").status_code == 200
    m = metrics(base)
    assert m["ouroboros_queue_depth"] == 0 and m["ouroboros_requests_running"] == 0


@pytest.fixture(scope="module")
def endless():
    """A server whose target never emits EOS, for generations long enough to walk away from."""
    target, draft = make_pair(eos=None, arch="llama", seed=3, context=4096)
    with serving(create_app(target, draft, TOKENIZER, model_name=MODEL)) as url:
        yield url


def open_stream(stack: contextlib.ExitStack, base: str, max_tokens: int):
    response = stack.enter_context(httpx.stream(
        "POST", base + "/v1/completions", timeout=30,
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


# --- bad input ---------------------------------------------------------------------------------------------

OK = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def without(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


BAD = [
    ("completions", b"{", 400, None),
    ("completions", b"[1, 2]", 400, None),
    ("completions", b"\xff\xfe", 400, None),
    ("completions", b"[" * 100_000, 400, None),
    ("completions", without(OK, "model"), 400, "model"),
    ("completions", without(OK, "prompt"), 400, "prompt"),
    ("chat/completions", without(CHAT, "messages"), 400, "messages"),
    ("completions", {**OK, "model": "gpt-4"}, 404, "model"),
    ("completions", {**OK, "max_tokens": "5"}, 400, "max_tokens"),
    ("completions", {**OK, "max_tokens": 2.0}, 400, "max_tokens"),
    ("completions", {**OK, "temperature": "hot"}, 400, "temperature"),
    ("completions", {**OK, "stream": "yes"}, 400, "stream"),
    ("completions", {**OK, "stream": True, "stream_options": {"include_usage": 1}}, 400,
     "stream_options.include_usage"),
    ("completions", {**OK, "prompt": 5}, 400, "prompt"),
    ("completions", {**OK, "prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {**OK, "prompt": [1, 99999]}, 400, "prompt"),
    ("completions", {**OK, "prompt": ""}, 400, "prompt"),
    ("completions", {**OK, "prompt": "\ud800"}, 400, "prompt"),
    ("completions", {**OK, "stop": 5}, 400, "stop"),
    ("completions", {**OK, "stop": [""]}, 400, "stop"),
    ("completions", {**OK, "n": 2}, 400, "n"),
    ("completions", {**OK, "logprobs": 2}, 400, "logprobs"),
    ("completions", {**OK, "temperature": 2.5}, 400, "temperature"),
    ("completions", {**OK, "temperature": -1}, 400, "temperature"),
    ("completions", {**OK, "top_p": 1.5}, 400, "top_p"),
    ("completions", {**OK, "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {**OK, "max_tokens": -3}, 400, "max_tokens"),
    ("completions", {**OK, "max_tokens": 10 ** 30}, 400, "max_tokens"),
    ("completions", {**OK, "prompt": "x" * 1100}, 400, "prompt"),
    ("chat/completions", {**CHAT, "messages": "Hi"}, 400, "messages"),
    ("chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": 3}]}, 400, "messages.0.content"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages.0.content"),
    ("chat/completions", {**CHAT, "n": 3}, 400, "n"),
    ("chat/completions", {**CHAT, "max_completion_tokens": 5000}, 400, "max_completion_tokens"),
]


@pytest.mark.parametrize("path, body, status, param", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors(base, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{base}/v1/{path}", content=content, headers={"content-type": "application/json"},
                          timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_bad_input_leaves_the_server_healthy(base):
    responses = [httpx.post(base + "/v1/completions", content=b"x" * (2 * 1024 * 1024), timeout=30),
                 httpx.get(base + "/v1/nothing-here"), httpx.delete(base + "/v1/completions")]
    assert [r.status_code for r in responses] == [413, 404, 405]
    assert all("error" in r.json() for r in responses)
    assert httpx.get(base + "/health").status_code == 200
    assert client(base).completions.create(model=MODEL, prompt="Hi", max_tokens=3).usage.completion_tokens == 3


def test_openai_client_sees_bad_request_errors(base):
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client(base).completions.create(model=MODEL, prompt="Hi", n=2)


# --- errors that name the problem, and bugs that stay on the server ---------------------------------------

TINY_TEMPERATURES = [1e-45, 1e-300, 5e-324]  # logits / temperature overflow: generate refuses them


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
@pytest.mark.parametrize("stream", [False, True])
def test_temperature_too_small_to_sample_is_a_400(base, temperature, stream):
    body = {**OK, "temperature": temperature, "stream": stream}
    response = httpx.post(base + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text  # refused before queueing, so a stream never starts
    error = response.json()["error"]
    assert error["param"] == "temperature" and "temperature" in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
def test_openai_client_sees_a_tiny_temperature_refused(base, temperature):
    with pytest.raises(openai.BadRequestError, match="temperature") as info:
        client(base).chat.completions.create(**CHAT, temperature=temperature)
    assert info.value.body["param"] == "temperature"


def internal_error_id(response) -> str:
    """The request id of a 500 that tells nothing else."""
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["param"] is None
    prefix = "internal error (request id "
    assert error["message"].startswith(prefix) and error["message"].endswith(")")
    return error["message"][len(prefix):-1]


def broken(*args, **kwargs):
    raise RuntimeError("probability tensor contains inf, nan (secret internals)")


@pytest.mark.parametrize("module, name, path, body", [
    (server_worker, "generate", "completions", OK),  # on the worker thread
    (server_app, "token_budget", "chat/completions", CHAT),  # in the request's coroutine
])
def test_a_bug_is_a_500_that_exposes_nothing(base, monkeypatch, caplog, module, name, path, body):
    monkeypatch.setattr(module, name, broken)
    response = httpx.post(f"{base}/v1/{path}", json=body, timeout=30)
    request_id = internal_error_id(response)
    assert "secret" not in response.text and "Traceback" not in response.text
    # the traceback stays in the server's log, under the id the client was given
    assert any(request_id in r.getMessage() and r.exc_info and r.exc_info[0] is RuntimeError for r in caplog.records)
    monkeypatch.undo()
    assert client(base).completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_a_bug_in_a_stream_ends_it_with_an_error_that_exposes_nothing(base, monkeypatch):
    monkeypatch.setattr(server_worker, "generate", broken)
    with httpx.stream("POST", base + "/v1/completions", json={**OK, "stream": True}, timeout=30) as stream:
        events = [line for line in stream.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["message"].startswith("internal error (request id ")
    assert not any("secret" in line for line in events)


def test_a_package_error_from_generation_is_a_400(base, monkeypatch):
    def refuses(*args, **kwargs):
        raise InvalidArgumentError("temperature 0.5 is refused by this test")

    monkeypatch.setattr(server_worker, "generate", refuses)
    response = httpx.post(base + "/v1/completions", json=OK, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"] == {"message": "temperature 0.5 is refused by this test",
                                        "type": "invalid_request_error", "param": "temperature", "code": None}


# --- only JSON bodies ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body", [("completions", OK), ("chat/completions", CHAT)])
@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain; charset=utf-8",
                                          "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                          "application/jsonp", "application/json-seq"])
def test_post_needs_a_json_content_type(base, path, body, content_type):
    """A browser page may POST text/plain or a form to a local server without a CORS preflight."""
    before = metrics(base)
    headers = {} if content_type is None else {"content-type": content_type}
    response = httpx.post(f"{base}/v1/{path}", content=json.dumps(body).encode(), headers=headers, timeout=30)
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "application/json" in error["message"]
    assert error["type"] == "invalid_request_error" and error["code"] == "unsupported_media_type"
    after = metrics(base)
    assert {k: v for k, v in after.items() if k.startswith("ouroboros_requests_total")} == {
        k: v for k, v in before.items() if k.startswith("ouroboros_requests_total")}  # nothing was queued


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
def test_json_content_type_with_parameters_is_accepted(base, content_type):
    response = httpx.post(base + "/v1/completions", content=json.dumps(OK).encode(),
                          headers={"content-type": content_type}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


# --- a bounded queue ------------------------------------------------------------------------------------------

def test_a_full_queue_answers_503_with_retry_after(pair, monkeypatch):
    """One request runs (held at a gate), two wait (max_queue=2): the next is refused at once, streamed
    or not, and the held and waiting ones still complete once the gate opens."""
    target, draft = pair
    gate, running = threading.Event(), threading.Event()
    real_generate = server_worker.generate

    def gated(*args, **kwargs):
        running.set()
        assert gate.wait(60), "the test never opened the gate"
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(server_worker, "generate", gated)
    with serving(create_app(target, draft, TOKENIZER, model_name=MODEL, max_queue=2)) as url, \
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
def test_max_queue_must_be_a_count(pair, max_queue):
    with pytest.raises(ValueError, match="max_queue"):
        create_app(*pair, TOKENIZER, max_queue=max_queue)


# --- API key -----------------------------------------------------------------------------------------------

def test_api_key(pair):
    target, draft = pair
    with serving(create_app(target, draft, TOKENIZER, model_name=MODEL, api_key="s3cret-key")) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}):
            response = httpx.post(url + "/v1/completions", json=OK, headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        assert client(url, api_key="s3cret-key").completions.create(**OK).usage.completion_tokens == 2
        assert metrics(url, Authorization="Bearer s3cret-key")["ouroboros_generated_tokens_total"] == 2


# --- phrase pool file --------------------------------------------------------------------------------------

def test_pool_file_round_trip(pair, tmp_path):
    target, draft = pair
    path = tmp_path / "pool.json"
    with serving(create_app(target, draft, TOKENIZER, model_name=MODEL, pool_file=path)) as url:
        client(url).completions.create(model=MODEL, prompt="Hello there", max_tokens=10)
        phrases = metrics(url)["ouroboros_pool_phrases"]
    assert phrases > 0
    pool, metadata = PhrasePool.load(path)  # saved on shutdown
    assert len(pool) == phrases and metadata["tokenizer_sha256"] == tokenizer_fingerprint(TOKENIZER)
    with serving(create_app(target, draft, TOKENIZER, model_name=MODEL, pool_file=path)) as url:
        assert metrics(url)["ouroboros_pool_phrases"] == phrases  # warm from the start


def test_pool_file_is_saved_periodically(pair, tmp_path):
    target, draft = pair
    path = tmp_path / "pool.json"
    with serving(create_app(target, draft, TOKENIZER, model_name=MODEL, pool_file=path,
                            pool_save_interval=0.2)) as url:
        client(url).completions.create(model=MODEL, prompt="Hello", max_tokens=5)
        wait_for(path.exists, timeout=10)
        assert len(PhrasePool.load(path)[0]) > 0


@pytest.mark.parametrize("content, message", [
    ("{not json", "cannot load phrase pool file"),
    (json.dumps({"format": "ouroboros-phrase-pool/1", "metadata": {"tokenizer_sha256": "0" * 64}, "level": 4,
                 "capacity": 8, "phrases": []}), "another tokenizer"),
    (None, "holds 3-grams"),
])
def test_unusable_pool_file_stops_the_start_and_is_kept(pair, tmp_path, content, message):
    target, draft = pair
    path = tmp_path / "pool.json"
    if content is None:
        PhrasePool(level=3).save(path, metadata={"tokenizer_sha256": tokenizer_fingerprint(TOKENIZER)})
        content = path.read_text()
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        create_app(target, draft, TOKENIZER, pool_file=path)
    assert str(path) in str(info.value)
    assert path.read_text() == content


def test_pool_file_needs_a_shared_pool(pair, tmp_path):
    with pytest.raises(ValueError, match="--pool shared"):
        create_app(*pair, TOKENIZER, pool_mode="per-request", pool_file=tmp_path / "pool.json")


def test_per_request_pool(pair):
    target, draft = pair
    expected = decode(hf_greedy(target, TOKENIZER("Hello").input_ids, 10))
    with serving(create_app(target, draft, TOKENIZER, model_name=MODEL, pool_mode="per-request")) as url:
        assert client(url).completions.create(model=MODEL, prompt="Hello", max_tokens=10).choices[0].text == expected
        assert metrics(url)["ouroboros_pool_phrases"] == 0


# --- the command line --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("pair"))


def test_cli_refuses_a_corrupted_pool_file(pair_dirs, tmp_path, capsys):
    path = tmp_path / "pool.json"
    path.write_text("garbage")
    target, draft = pair_dirs
    code = cli_main(["serve", "--target", str(target), "--draft", str(draft), "--dtype", "float32",
                     "--pool-file", str(path)])
    assert code == 2
    assert str(path) in capsys.readouterr().err
    assert path.read_text() == "garbage"


def test_cli_serves_and_saves_the_pool_on_shutdown(pair_dirs, tmp_path):
    target, draft = pair_dirs
    path = tmp_path / "pool.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OUROBOROS_API_KEY": "k3y"}
    process = subprocess.Popen([sys.executable, "-m", "ouroboros.cli", "serve", "--target", str(target),
                                "--draft", str(draft), "--dtype", "float32", "--port", str(port),
                                "--pool-file", str(path), "--log-level", "warning"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert process.poll() is None, process.communicate()[1]
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=90)
        c = client(url, api_key="k3y")
        assert [m.id for m in c.models.list().data] == ["target"]  # the target directory's name
        assert c.completions.create(model="target", prompt="Hello", max_tokens=8).usage.completion_tokens == 8
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode in (0, 130), err
    assert len(PhrasePool.load(path)[0]) > 0


def test_cli_banner_says_where_what_and_how(pair_dirs):
    """--port 0 binds a free port, and the banner names it: the URL in the banner is the one that answers."""
    target, draft = pair_dirs
    argv = [sys.executable, "-m", "ouroboros.cli", "serve", "--target", str(target), "--draft", str(draft), "--dtype",
            "float32", "--port", "0", "--method", "speculative", "--max-queue", "5", "--api-key", "k3y",
            "--log-level", "warning"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            banner = "".join(process.stdout.readline() for _ in range(5))
            assert banner.startswith("ouroboros serve: http://127.0.0.1:"), banner
            assert "model id: target" in banner and "method:   speculative" in banner
            assert "API key:  required" in banner and "up to 5 waiting" in banner
            url = banner.split()[2].removesuffix("/v1")
            assert httpx.get(url + "/health", timeout=30).status_code == 200  # bound before the banner: no retry
            assert [m.id for m in client(url, api_key="k3y").models.list().data] == ["target"]
        finally:
            process.send_signal(signal.SIGINT)  # as Ctrl-C: stops the server whatever the test found
            try:
                _, err = process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                raise
    assert process.returncode == 0, err


@pytest.mark.parametrize("argv, message", [
    (["--max-queue", "-1"], "--max-queue must be >= 0"),
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--default-max-tokens", "0"], "--default-max-tokens must be >= 1"),
    (["--method", "speculative"], "--method speculative needs a draft model"),
])
def test_cli_refuses_bad_serve_settings_before_loading(argv, message, capsys):
    assert cli_main(["serve", "--target", "/nonexistent", *argv]) == 2
    assert message in capsys.readouterr().err


def test_auto_serves_exact_text_and_reports_its_choices_in_metrics(pair):
    """A server on method="auto" (the CLI's default): the same greedy text as HF, and /metrics
    says which arm each generation started with and how many steps each arm ran."""
    target, draft = pair
    app = create_app(target, draft, TOKENIZER, method="auto", model_name=MODEL)
    with serving(app) as base:
        response = client(base).completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24)
        expected = decode(hf_greedy(target, TOKENIZER(PROMPTS[0]).input_ids, 24))
        assert response.choices[0].text == expected
        m = metrics(base)
    assert sum(v for k, v in m.items() if k.startswith("ouroboros_auto_plans_total{")) == 1
    steps = sum(v for k, v in m.items() if k.startswith("ouroboros_auto_steps_total{"))
    assert steps == m["ouroboros_target_forwards_total"] > 0
    assert {'ouroboros_auto_events_total{event="probes"}', 'ouroboros_auto_events_total{event="fallbacks"}',
            'ouroboros_draft_trunks_total{result="full"}'} <= set(m)
