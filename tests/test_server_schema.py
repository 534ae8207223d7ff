"""Requests the server refuses, each with an OpenAI-shaped error naming the field (`param`) and
nothing queued: malformed JSON, wrong types and ranges, unsupported options, bodies that are not
JSON, temperatures too small to sample."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from server_helpers import CHAT, MODEL, OK, client, metrics  # noqa: E402


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
def test_bad_requests_get_openai_errors(server_url, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server_url}/v1/{path}", content=content, headers={"content-type": "application/json"},
                          timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_bad_input_leaves_the_server_healthy(server_url):
    responses = [httpx.post(server_url + "/v1/completions", content=b"x" * (2 * 1024 * 1024), timeout=30),
                 httpx.get(server_url + "/v1/nothing-here"), httpx.delete(server_url + "/v1/completions")]
    assert [r.status_code for r in responses] == [413, 404, 405]
    assert all("error" in r.json() for r in responses)
    assert httpx.get(server_url + "/health").status_code == 200
    assert client(server_url).completions.create(model=MODEL, prompt="Hi", max_tokens=3).usage.completion_tokens == 3


def test_openai_client_sees_bad_request_errors(server_url):
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client(server_url).completions.create(model=MODEL, prompt="Hi", n=2)


TINY_TEMPERATURES = [1e-45, 1e-300, 5e-324]  # logits / temperature overflow: generate refuses them


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
@pytest.mark.parametrize("stream", [False, True])
def test_temperature_too_small_to_sample_is_a_400(server_url, temperature, stream):
    body = {**OK, "temperature": temperature, "stream": stream}
    response = httpx.post(server_url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text  # refused before queueing, so a stream never starts
    error = response.json()["error"]
    assert error["param"] == "temperature" and "temperature" in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
def test_openai_client_sees_a_tiny_temperature_refused(server_url, temperature):
    with pytest.raises(openai.BadRequestError, match="temperature") as info:
        client(server_url).chat.completions.create(**CHAT, temperature=temperature)
    assert info.value.body["param"] == "temperature"


@pytest.mark.parametrize("path, body", [("completions", OK), ("chat/completions", CHAT)])
@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain; charset=utf-8",
                                          "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                          "application/jsonp", "application/json-seq"])
def test_post_needs_a_json_content_type(server_url, path, body, content_type):
    """A browser page may POST text/plain or a form to a local server without a CORS preflight."""
    before = metrics(server_url)
    headers = {} if content_type is None else {"content-type": content_type}
    response = httpx.post(f"{server_url}/v1/{path}", content=json.dumps(body).encode(), headers=headers, timeout=30)
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "application/json" in error["message"]
    assert error["type"] == "invalid_request_error" and error["code"] == "unsupported_media_type"
    after = metrics(server_url)
    assert {k: v for k, v in after.items() if k.startswith("ouroboros_requests_total")} == {
        k: v for k, v in before.items() if k.startswith("ouroboros_requests_total")}  # nothing was queued


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
def test_json_content_type_with_parameters_is_accepted(server_url, content_type):
    response = httpx.post(server_url + "/v1/completions", content=json.dumps(OK).encode(),
                          headers={"content-type": content_type}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2
