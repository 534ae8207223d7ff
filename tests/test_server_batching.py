"""`ouroboros serve --max-batch N`: requests decoded together, joining and leaving the running batch
at any step. Through the real `openai` client: every answer equals the request alone (and the
target's greedy output), clients that leave mid-stream free their row while the others go on, and
the counters add up."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import torch  # noqa: E402
from server_helpers import (  # noqa: E402
    MODEL,
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

import ouroboros.request as request_module  # noqa: E402
from ouroboros import InvalidArgumentError, generate  # noqa: E402
from ouroboros.acceptance import Sampler  # noqa: E402
from ouroboros.batch_session import BatchSession  # noqa: E402
from ouroboros.model_facts import kv_bytes_per_token  # noqa: E402
from ouroboros.server import create_app  # noqa: E402
from ouroboros.server.kv_budget import KV_SLACK  # noqa: E402


@pytest.fixture(scope="module")
def batched():
    """A server decoding up to 4 requests together, on a target that never emits EOS."""
    target, draft = make_pair(eos=None, arch="llama", seed=3, context=4096)
    with serving(create_app(target, draft, TOKENIZER, model_name=MODEL, max_batch=4)) as url:
        yield url, target


def test_concurrent_clients_get_exactly_their_solo_answers(batched):
    url, target = batched
    lengths = {p: 4 + 3 * (i % 4) for i, p in enumerate(PROMPTS)}  # rows end at different steps
    expected = {p: decode(hf_greedy(target, TOKENIZER(p).input_ids, lengths[p])) for p in PROMPTS}

    def run(i: int) -> list[tuple[str, str]]:
        c = client(url, timeout=90)
        answers = []
        for j in range(3):
            prompt = PROMPTS[(i + j) % len(PROMPTS)]
            if (i + j) % 2:
                text = "".join(ch.choices[0].text for ch in c.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=lengths[prompt], stream=True))
            else:
                text = c.completions.create(model=MODEL, prompt=prompt, max_tokens=lengths[prompt]).choices[0].text
            answers.append((prompt, text))
        return answers

    before = metrics(url)
    with ThreadPoolExecutor(12) as pool:
        answers = [answer for f in [pool.submit(run, i) for i in range(12)] for answer in f.result(timeout=180)]
    assert len(answers) == 36 and all(text == expected[prompt] for prompt, text in answers)
    m = metrics(url)
    assert m["ouroboros_queue_depth"] == 0 and m["ouroboros_requests_running"] == 0
    finished = 'ouroboros_requests_finished_total{reason="length"}'
    assert m[finished] - before[finished] == 36
    steps = m["ouroboros_batch_steps_total"] - before["ouroboros_batch_steps_total"]
    rows = m["ouroboros_batch_rows_total"] - before["ouroboros_batch_rows_total"]
    assert steps > 0 and rows / steps > 1.5, (rows, steps)  # requests were decoded together


def test_clients_that_leave_mid_stream_free_their_rows_and_the_others_go_on(batched):
    url, target = batched
    before = metrics(url)
    aborted = 'ouroboros_requests_finished_total{reason="aborted"}'
    expected = decode(hf_greedy(target, TOKENIZER(PROMPTS[2]).input_ids, 40))
    with ThreadPoolExecutor(1) as pool:
        with contextlib.ExitStack() as leaving:
            streams = []  # kept: a line iterator that is dropped closes its response
            for _ in range(2):
                response = leaving.enter_context(httpx.stream(
                    "POST", url + "/v1/completions", timeout=30,
                    json={"model": MODEL, "prompt": "Hello", "max_tokens": 4000, "stream": True}))
                streams.append(response.iter_lines())
                assert next(line for line in streams[-1] if line).startswith("data: {")
            staying = pool.submit(lambda: client(url).completions.create(model=MODEL, prompt=PROMPTS[2],
                                                                         max_tokens=40).choices[0].text)
            # answered beside the two long streams, not behind them (they would take 4000 tokens each)
            assert staying.result(timeout=60) == expected
            assert metrics(url)["ouroboros_requests_running"] == 2
        wait_for(lambda: metrics(url)[aborted] == before[aborted] + 2)
    m = metrics(url)
    assert m["ouroboros_requests_running"] == 0
    assert m["ouroboros_generated_tokens_total"] - before["ouroboros_generated_tokens_total"] < 2 * 4000


def test_a_failing_step_fails_its_requests_and_the_server_goes_on(batched, monkeypatch, caplog):
    """A failure of a whole batched step (not of one row): each of its requests gets its own 500,
    and the next request is served. The first request runs alone until the second arrives and both
    are rows of the step that fails."""
    url, target = batched
    real, failures = BatchSession.step, []

    def step(self):
        if not failures:
            failures.append(1)
            raise RuntimeError("a bug inside a step")
        return real(self)

    def request(prompt: str, max_tokens: int):
        with pytest.raises(openai.InternalServerError, match="internal error"):
            client(url).completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens)

    monkeypatch.setattr(BatchSession, "step", step)
    before = metrics(url)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(request, PROMPTS[0], 2000)
        wait_for(lambda: metrics(url)["ouroboros_requests_running"] == 1)
        second = pool.submit(request, PROMPTS[2], 5)
        first.result(timeout=60), second.result(timeout=60)
    assert "a bug inside a step" in caplog.text
    text = client(url).completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=5).choices[0].text
    assert text == decode(hf_greedy(target, TOKENIZER(PROMPTS[1]).input_ids, 5))
    m = metrics(url)
    error = 'ouroboros_requests_finished_total{reason="error"}'
    assert m[error] == before[error] + 2 and m["ouroboros_requests_running"] == 0


@pytest.mark.parametrize("max_batch", [0, 65, 2.5, True])
def test_max_batch_must_be_a_row_count(max_batch):
    target, draft = make_pair()
    with pytest.raises(InvalidArgumentError, match="max_batch"):
        create_app(target, draft, TOKENIZER, model_name=MODEL, max_batch=max_batch)


FAILING_TEMPERATURE = 1.234


def test_sixteen_clients_with_leavers_bad_requests_and_failures_inside_generation(batched, monkeypatch):
    """16 concurrent clients: 6 ordinary requests, 4 that leave mid-stream, 4 bad requests and 2 whose
    generation fails (NaN logits in their own sampling, alone or in the batch). Every ordinary answer
    equals the request alone; each failure gets its own 500 while the rows beside it go on; the
    counters add up (accepted = finished + aborted + failed; bad requests rejected, never queued)."""
    url, target = batched

    class PoisonedSampler(Sampler):  # a failing request's logits turn NaN, alone or in the batch
        def __init__(self, temperature=1.0, *args, **kwargs):
            super().__init__(temperature, *args, **kwargs)
            self.poisoned = temperature == FAILING_TEMPERATURE

        def verify(self, tree, logits):
            return super().verify(tree, torch.full_like(logits, float("nan")) if self.poisoned else logits)

    monkeypatch.setattr(request_module, "Sampler", PoisonedSampler)
    lengths = {p: 6 + 2 * i for i, p in enumerate(PROMPTS[:6])}
    expected = {p: decode(hf_greedy(target, TOKENIZER(p).input_ids, lengths[p])) for p in lengths}
    bad = [dict(prompt="Hi", max_tokens=0), dict(prompt="Hi", max_tokens=4, temperature=-1.0),
           dict(prompt="Hi", max_tokens=4, top_p=1.5), dict(prompt="Hi", max_tokens=4, stop=["x"] * 17)]

    def ordinary(prompt, stream):
        c = client(url, timeout=120)
        if stream:
            return "".join(ch.choices[0].text for ch in c.completions.create(
                model=MODEL, prompt=prompt, max_tokens=lengths[prompt], stream=True))
        return c.completions.create(model=MODEL, prompt=prompt, max_tokens=lengths[prompt]).choices[0].text

    def leaver():
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"model": MODEL, "prompt": "Hello", "max_tokens": 4000, "stream": True}) as response:
            lines = response.iter_lines()
            return next(line for line in lines if line).startswith("data: {")

    def failing(prompt):
        with pytest.raises(openai.InternalServerError, match="internal error") as caught:
            client(url).completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=FAILING_TEMPERATURE)
        return caught.value.status_code

    def refused(body):
        with pytest.raises(openai.BadRequestError) as caught:
            client(url).completions.create(model=MODEL, **body)
        return caught.value.status_code

    before = metrics(url)
    with ThreadPoolExecutor(16) as pool:
        answers = {p: pool.submit(ordinary, p, i % 2) for i, p in enumerate(lengths)}
        leavers = [pool.submit(leaver) for _ in range(4)]
        failures = [pool.submit(failing, p) for p in ("FAIL one", "FAIL two")]
        refusals = [pool.submit(refused, body) for body in bad]
        assert {p: f.result(timeout=180) for p, f in answers.items()} == expected
        assert all(f.result(timeout=60) for f in leavers)
        assert [f.result(timeout=60) for f in failures] == [500, 500]
        assert [f.result(timeout=60) for f in refusals] == [400] * 4
    finished = lambda m: {reason: m[f'ouroboros_requests_finished_total{{reason="{reason}"}}']  # noqa: E731
                          for reason in ("stop", "length", "aborted", "error")}
    wait_for(lambda: metrics(url)["ouroboros_requests_running"] == 0)
    m = metrics(url)
    done = {reason: count - finished(before)[reason] for reason, count in finished(m).items()}
    accepted = sum(m[k] - before[k] for k in m if k.startswith("ouroboros_requests_total"))
    assert done == {"stop": 0, "length": 6, "aborted": 4, "error": 2} and accepted == sum(done.values()) == 12
    assert m["ouroboros_requests_rejected_total"] - before["ouroboros_requests_rejected_total"] == 4
    ttft = "ouroboros_time_to_first_token_seconds"
    assert m[f"{ttft}_count"] - before[f"{ttft}_count"] == 10  # the ordinary requests and the leavers, not the failures
    assert m[f'{ttft}_bucket{{le="+Inf"}}'] == m[f"{ttft}_count"] and m[f"{ttft}_sum"] > before[f"{ttft}_sum"]
    assert failing("FAIL alone") == 500  # alone on the single-stream loop, its own failure is its own 500 too


def test_a_request_alone_runs_the_single_stream_loop_then_joins_the_batch_exactly(batched):
    """The batch is empty, so a request runs alone (the single-stream loop, as fast as --max-batch 1);
    when another arrives it joins the batch where it stands. Its text is still exactly its own: greedy,
    and seeded sampling (its random stream goes on in the batch)."""
    url, target = batched
    sampled = dict(temperature=0.8, seed=7)
    ids = {p: TOKENIZER(p).input_ids for p in PROMPTS[:4]}
    alone = {p: decode(generate(target, torch.tensor([ids[p]]), method="vanilla", max_new_tokens=60, eos_token_id=[],
                                do_sample=True, temperature=0.8, seed=7).sequences[0, len(ids[p]):].tolist())
             for p in PROMPTS[2:4]}
    before = metrics(url)

    def first_then_rest(prompt: str, **options) -> str:
        chunks = client(url).completions.create(model=MODEL, prompt=prompt, max_tokens=60, stream=True, **options)
        first = next(iter(chunks)).choices[0].text  # it runs alone now: let another request come
        joined = client(url).completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=5).choices[0].text
        assert joined == decode(hf_greedy(target, ids[PROMPTS[1]], 5))
        return first + "".join(chunk.choices[0].text for chunk in chunks)

    assert first_then_rest(PROMPTS[0]) == decode(hf_greedy(target, ids[PROMPTS[0]], 60))
    for prompt in PROMPTS[2:4]:
        assert first_then_rest(prompt, **sampled) == alone[prompt]
    assert metrics(url)["ouroboros_batch_handoffs_total"] - before["ouroboros_batch_handoffs_total"] == 3


def test_requests_wait_for_kv_memory_and_one_that_never_fits_is_refused():
    """--kv-memory for two rows of these requests: four sent together run at most two at a time (the
    others wait in the queue, first come first served), each answer still exact; a request whose
    prompt and max_tokens alone need more is refused with a 400 that says so."""
    target, draft = make_pair(eos=None, arch="llama", seed=5)
    prompts = [p for p in PROMPTS if len(TOKENIZER(p).input_ids) <= 8][:4]
    row = (8 + 12 + KV_SLACK) * (kv_bytes_per_token(target) + kv_bytes_per_token(draft))
    with serving(create_app(target, draft, TOKENIZER, model_name=MODEL, max_batch=4, kv_memory=2 * row)) as url:
        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(lambda p: client(url).completions.create(model=MODEL, prompt=p, max_tokens=12)
                                  .choices[0].text, prompts))
        assert texts == [decode(hf_greedy(target, TOKENIZER(p).input_ids, 12)) for p in prompts]
        m = metrics(url)
        assert 0 < m["ouroboros_batch_rows_total"] <= 2 * m["ouroboros_batch_steps_total"]
        with pytest.raises(openai.BadRequestError, match="--kv-memory"):
            client(url).completions.create(model=MODEL, prompt=prompts[0], max_tokens=400)
