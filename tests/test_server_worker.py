"""What the worker does with a request: stop strings cut where they start (never leaked, even
across tokens), errors from generation (a package error is a 400, a bug a 500 that exposes
nothing), and the phrase pool (shared and saved to its file, or one per request)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402
from server_helpers import (  # noqa: E402
    CHAT,
    MODEL,
    OK,
    PROMPTS,
    TOKENIZER,
    client,
    decode,
    hf_greedy,
    metrics,
    serving,
    wait_for,
)

from ouroboros import InvalidArgumentError, PhrasePool  # noqa: E402
from ouroboros.server import TextTracker, create_app, tokenizer_fingerprint  # noqa: E402
from ouroboros.server import app as server_app  # noqa: E402
from ouroboros.server import worker as server_worker  # noqa: E402


def stop_case(target, prompt: str) -> tuple[str, str]:
    """A 3-character stop string from the middle of the greedy output, and the text before it."""
    text = decode(hf_greedy(target, TOKENIZER(prompt).input_ids, 40))
    for start in range(len(text) // 3, len(text) - 3):
        stop = text[start:start + 3]
        if "\ufffd" not in stop and len(stop.encode()) >= 3:  # spans at least 3 byte tokens
            return stop, text[:text.find(stop)]
    pytest.fail(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_stop_strings_across_tokens_are_not_leaked(server_url, server_pair, prompt):
    stop, before = stop_case(server_pair[0], prompt)
    c = client(server_url)
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
def test_a_bug_is_a_500_that_exposes_nothing(server_url, monkeypatch, caplog, module, name, path, body):
    monkeypatch.setattr(module, name, broken)
    response = httpx.post(f"{server_url}/v1/{path}", json=body, timeout=30)
    request_id = internal_error_id(response)
    assert "secret" not in response.text and "Traceback" not in response.text
    # the traceback stays in the server's log, under the id the client was given
    assert any(request_id in r.getMessage() and r.exc_info and r.exc_info[0] is RuntimeError for r in caplog.records)
    monkeypatch.undo()
    assert client(server_url).completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_a_bug_in_a_stream_ends_it_with_an_error_that_exposes_nothing(server_url, monkeypatch):
    monkeypatch.setattr(server_worker, "generate", broken)
    with httpx.stream("POST", server_url + "/v1/completions", json={**OK, "stream": True}, timeout=30) as stream:
        events = [line for line in stream.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["message"].startswith("internal error (request id ")
    assert not any("secret" in line for line in events)


def test_a_package_error_from_generation_is_a_400(server_url, monkeypatch):
    def refuses(*args, **kwargs):
        raise InvalidArgumentError("temperature 0.5 is refused by this test")

    monkeypatch.setattr(server_worker, "generate", refuses)
    response = httpx.post(server_url + "/v1/completions", json=OK, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"] == {"message": "temperature 0.5 is refused by this test",
                                        "type": "invalid_request_error", "param": "temperature", "code": None}


def test_pool_file_round_trip(server_pair, tmp_path):
    target, draft = server_pair
    path = tmp_path / "pool.json"
    with serving(create_app(target, draft, TOKENIZER, model_name=MODEL, pool_file=path)) as url:
        client(url).completions.create(model=MODEL, prompt="Hello there", max_tokens=10)
        phrases = metrics(url)["ouroboros_pool_phrases"]
    assert phrases > 0
    pool, metadata = PhrasePool.load(path)  # saved on shutdown
    assert len(pool) == phrases and metadata["tokenizer_sha256"] == tokenizer_fingerprint(TOKENIZER)
    with serving(create_app(target, draft, TOKENIZER, model_name=MODEL, pool_file=path)) as url:
        assert metrics(url)["ouroboros_pool_phrases"] == phrases  # warm from the start


def test_pool_file_is_saved_periodically(server_pair, tmp_path):
    target, draft = server_pair
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
def test_unusable_pool_file_stops_the_start_and_is_kept(server_pair, tmp_path, content, message):
    target, draft = server_pair
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


def test_pool_file_needs_a_shared_pool(server_pair, tmp_path):
    with pytest.raises(ValueError, match="--pool shared"):
        create_app(*server_pair, TOKENIZER, pool_mode="per-request", pool_file=tmp_path / "pool.json")


def test_per_request_pool(server_pair):
    target, draft = server_pair
    expected = decode(hf_greedy(target, TOKENIZER("Hello").input_ids, 10))
    with serving(create_app(target, draft, TOKENIZER, model_name=MODEL, pool_mode="per-request")) as url:
        assert client(url).completions.create(model=MODEL, prompt="Hello", max_tokens=10).choices[0].text == expected
        assert metrics(url)["ouroboros_pool_phrases"] == 0
