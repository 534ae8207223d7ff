"""The server's OpenAI API, driven by the real `openai` client and httpx: completions and chat,
streamed (server-sent events) or not, give the target's own greedy text; models, health, metrics,
seeded sampling, the API key, and method="auto"."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from server_helpers import (  # noqa: E402
    EOS,
    MODEL,
    OK,
    PROMPTS,
    TOKENIZER,
    chat_ids,
    client,
    decode,
    hf_greedy,
    metrics,
    serving,
)

from ouroboros.server import create_app  # noqa: E402


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_completion_matches_target_greedy_streamed_or_not(server_url, server_pair, prompt):
    ids = TOKENIZER(prompt).input_ids
    new = hf_greedy(server_pair[0], ids, 48)  # "Hello" reaches EOS within 48 tokens, the others do not
    c = client(server_url)
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


def test_chat_matches_target_greedy_streamed_or_not(server_url, server_pair):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    ids = chat_ids(messages)
    new = hf_greedy(server_pair[0], ids, 30)
    c = client(server_url)
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


def test_stream_is_server_sent_events_ending_with_done(server_url):
    with httpx.stream("POST", server_url + "/v1/completions", timeout=30,
                      json={"model": MODEL, "prompt": "Hello", "max_tokens": 5, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_models_health_and_metrics(server_url):
    models = client(server_url).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(server_url + "/health").json() == {"status": "ok"}
    m = metrics(server_url)
    for name in ("ouroboros_generated_tokens_total", "ouroboros_tokens_per_second", "ouroboros_mean_accepted_tokens",
                 "ouroboros_queue_depth", "ouroboros_pool_phrases", 'ouroboros_requests_total{endpoint="completions"}'):
        assert name in m


def test_sampling_with_a_seed_is_reproducible(server_url):
    c = client(server_url)
    kwargs = dict(model=MODEL, prompt="Hello", max_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    first, second = (c.completions.create(**kwargs).choices[0].text for _ in range(2))
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(**kwargs, stream=True))
    assert first == second == streamed  # same seed, same sample


def test_auto_serves_exact_text_and_reports_its_choices_in_metrics(server_pair):
    """A server on method="auto" (the CLI's default): the same greedy text as HF, and /metrics
    says which arm each generation started with and how many steps each arm ran."""
    target, draft = server_pair
    app = create_app(target, draft, TOKENIZER, method="auto", model_name=MODEL)
    with serving(app) as url:
        response = client(url).completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24)
        expected = decode(hf_greedy(target, TOKENIZER(PROMPTS[0]).input_ids, 24))
        assert response.choices[0].text == expected
        m = metrics(url)
    assert sum(v for k, v in m.items() if k.startswith("ouroboros_auto_plans_total{")) == 1
    steps = sum(v for k, v in m.items() if k.startswith("ouroboros_auto_steps_total{"))
    assert steps == m["ouroboros_target_forwards_total"] > 0
    assert {'ouroboros_auto_events_total{event="probes"}', 'ouroboros_auto_events_total{event="fallbacks"}',
            'ouroboros_draft_trunks_total{result="full"}'} <= set(m)


def test_api_key(server_pair):
    target, draft = server_pair
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


def test_create_app_defaults_to_the_serve_commands_method():
    """An app built in Python serves what `ouroboros serve` does."""
    import inspect

    from ouroboros.arguments import DEFAULT_METHOD

    assert inspect.signature(create_app).parameters["method"].default == DEFAULT_METHOD == "auto"
