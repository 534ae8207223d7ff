"""What the server tests share (tests/test_server_*.py): a tiny tokenizer and model pair, a live
uvicorn server on 127.0.0.1 in a thread, the real `openai` client and httpx to drive it, and the
target's own greedy output to compare with. Importing it skips a test module without the serve
extra or the clients."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import torch  # noqa: E402
from tiny_models import perturbed, tiny_model, tiny_tokenizer  # noqa: E402

MODEL = "tiny"
TOKENIZER = tiny_tokenizer()
EOS = TOKENIZER.convert_tokens_to_ids("<|im_end|>")
PROMPTS = ["Hello", "The quick brown fox", "def add(a, b):", "Once upon a time", "import torch", "SELECT * FROM",
           "1, 2, 3,", "Dear Sir,"]

# a valid body for each endpoint, for the tests that change or break one thing in it
OK = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


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
