"""The vLLM `custom_class` proposer (`ouroboros.integrations.vllm`) against a stand-in of vLLM's call:
rows as vLLM passes them (lists of sampled ids, numpy arrays of token ids and lengths), reordered and
finished rows, drafts sized by load, the pool shared across requests and kept in its file; and that
it proposes well: on requests that share phrases it gets more tokens per step than matching the
request's own context alone (what vLLM's `ngram` does)."""

from __future__ import annotations

import json
import os
import random
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest

from ouroboros.integrations.vllm import (
    BUDGET_ENV,
    POOL_ENV,
    DraftSettings,
    OuroborosProposer,
    PhraseChainDrafter,
    context_match,
)

MAX_LEN = 512


def vllm_config(k: int = 4, max_model_len: int = MAX_LEN):
    return SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=k),
                           model_config=SimpleNamespace(max_model_len=max_model_len))


class Batch:
    """vLLM's input batch as the proposer sees it: `token_ids_cpu` [rows, max_len] int32 and
    `num_tokens_no_spec` [rows] int32, a row per running request, rows reused once a request ends."""

    def __init__(self, rows: int = 8):
        self.token_ids = np.zeros((rows, MAX_LEN), dtype=np.int32)
        self.lengths = np.zeros(rows, dtype=np.int32)

    def put(self, row: int, tokens: list[int]) -> None:
        self.token_ids[row, :len(tokens)] = tokens
        self.lengths[row] = len(tokens)

    def call(self, proposer, sampled: list[list[int]]) -> list[list[int]]:
        return proposer.propose(sampled, self.lengths, self.token_ids)


def test_context_match_takes_the_longest_then_latest_earlier_occurrence():
    tokens = np.array([1, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3], dtype=np.int32)
    assert context_match(tokens, 2, 5, 3) == [7, 5, 2]  # "2 3" last seen before "7 5 2"
    assert context_match(np.array([4, 1, 2, 3, 8, 1, 2, 3]), 2, 5, 2) == [8, 1]  # "1 2 3" beats "2 3"
    assert context_match(np.array([1, 2, 3, 4]), 2, 5, 4) == []


def test_a_repeated_context_is_drafted_to_its_continuation():
    proposer = OuroborosProposer(vllm_config(k=4))
    batch = Batch()
    batch.put(0, [5, 6, 7, 8, 9, 10, 11, 5, 6, 7])
    assert batch.call(proposer, [[7]]) == [[8, 9, 10, 11]]


def test_phrases_learned_from_one_request_are_drafted_for_another():
    proposer, fresh = OuroborosProposer(vllm_config(k=4)), OuroborosProposer(vllm_config(k=4))
    batch = Batch()
    answer = [40, 41, 42, 43, 44, 45, 46]
    tokens = [1, 2, 3]
    for token in answer:  # request A generates its answer one token per step
        tokens.append(token)
        batch.put(0, tokens)
        batch.call(proposer, [[token]])
    batch.put(0, [9, 8, 7, 40, 41])  # request B, in the same row: its own context never had the phrase
    assert batch.call(proposer, [[41]]) == [[42, 43, 44, 45]]
    assert batch.call(fresh, [[41]]) == [[]]


def test_rows_reordered_finished_or_new_are_drafted_from_their_own_tokens(monkeypatch):
    monkeypatch.setenv(BUDGET_ENV, "99")  # every row its k tokens, whatever the batch
    contexts = {"a": [5, 6, 7, 8, 9, 5, 6], "b": [20, 21, 22, 23, 20, 21], "c": [30, 31, 32, 30, 31]}
    alone = {}
    for name, tokens in contexts.items():
        batch = Batch()
        batch.put(0, tokens)
        alone[name] = batch.call(OuroborosProposer(vllm_config(k=2)), [[tokens[-1]]])[0]
    proposer = OuroborosProposer(vllm_config(k=2))
    batch = Batch()
    batch.put(0, contexts["a"])
    batch.put(1, contexts["b"])
    assert batch.call(proposer, [[6], [21]]) == [alone["a"], alone["b"]]
    batch.put(0, contexts["b"])  # swapped rows, a finished row (no sampled tokens), a new request
    batch.put(1, contexts["a"])
    batch.put(3, contexts["c"])
    assert batch.call(proposer, [[21], [6], [], [31]]) == [alone["b"], alone["a"], [], alone["c"]]
    assert all(alone.values())


def test_fewer_tokens_per_row_as_the_batch_grows(monkeypatch):
    monkeypatch.setenv(BUDGET_ENV, "8")
    proposer = OuroborosProposer(vllm_config(k=4))
    batch = Batch(rows=8)
    repeated = list(range(100, 110)) * 3
    for row in range(8):
        batch.put(row, repeated[:25])
    one = batch.call(proposer, [[repeated[24]]])
    eight = batch.call(proposer, [[repeated[24]]] * 8)
    assert [len(d) for d in one] == [4]
    assert [len(d) for d in eight] == [1] * 8
    assert proposer.drafter.per_row(2) == 4 and proposer.drafter.per_row(4) == 2 and proposer.drafter.per_row(64) == 1


def test_no_draft_past_the_models_length():
    proposer = OuroborosProposer(vllm_config(k=4, max_model_len=12))
    batch = Batch()
    batch.put(0, [5, 6, 7, 8, 9, 10, 11, 5, 6, 7])
    assert batch.call(proposer, [[7]]) == [[8, 9]]
    batch.put(0, [5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8, 9])
    assert batch.call(proposer, [[9]]) == [[]]


def test_the_pool_is_saved_to_and_loaded_from_its_file(tmp_path, monkeypatch):
    monkeypatch.setenv(POOL_ENV, str(tmp_path / "pool.json"))
    first = OuroborosProposer(vllm_config())
    batch = Batch()
    tokens = [1, 2, 3]
    for token in [60, 61, 62, 63, 64, 65]:
        tokens.append(token)
        batch.put(0, tokens)
        batch.call(first, [[token]])
    first.save()
    second = OuroborosProposer(vllm_config())
    assert len(second.drafter.pool) == len(first.drafter.pool) > 0
    batch.put(0, [9, 60, 61])
    assert batch.call(second, [[61]]) == [[62, 63, 64, 65]]


def simulate(proposer, answers: list[list[int]], batch: int) -> float:
    """Drive `proposer` as vLLM would, `batch` requests at a time, each target answer fixed in advance:
    a step accepts the draft's longest correct prefix plus one token. Returns tokens per row-step."""
    state = Batch(rows=batch)
    queue = list(enumerate(answers))
    running: dict[int, tuple[list[int], list[int]]] = {}  # row -> (tokens so far, answer left)
    sampled: dict[int, list[int]] = {}
    tokens_out = steps = 0
    while queue or running:
        for row in range(batch):
            if row not in running and queue:
                _, answer = queue.pop(0)
                running[row] = ([7, 7, 7], list(answer))
                sampled[row] = [running[row][1].pop(0)]
                running[row][0].append(sampled[row][0])
        for row, (tokens, _) in running.items():
            state.put(row, tokens)
        rows = sorted(running)
        drafts = state.call(proposer, [sampled.get(row, []) if row in running else [] for row in range(batch)])
        for row in rows:
            tokens, left = running[row]
            accepted = 0
            while accepted < len(drafts[row]) and accepted < len(left) and drafts[row][accepted] == left[accepted]:
                accepted += 1
            take = left[:accepted + 1]
            del left[:accepted + 1]
            tokens += take
            sampled[row] = take
            tokens_out += len(take)
            steps += 1
            if not left:
                del running[row]
    return tokens_out / steps


def phrased_answers(seed: int, count: int = 24, phrases: int = 12, length: int = 60) -> list[list[int]]:
    """Answers made of phrases shared across requests (as code shares idioms), with noise tokens."""
    rng = random.Random(seed)
    shared = [[rng.randrange(100, 5000) for _ in range(rng.randrange(4, 9))] for _ in range(phrases)]
    answers = []
    for _ in range(count):
        answer: list[int] = []
        while len(answer) < length:
            answer += rng.choice(shared) if rng.random() < 0.7 else [rng.randrange(5000, 9000)]
        answers.append(answer[:length])
    return answers


@pytest.mark.parametrize("batch", [1, 4])
def test_it_proposes_better_than_its_own_context_alone(batch):
    answers = phrased_answers(seed=batch)
    ouroboros = simulate(OuroborosProposer(vllm_config(k=4)), answers, batch)
    assert ouroboros > 1.3 * simulate(context_only(), answers, batch)


def context_only() -> OuroborosProposer:
    """The same proposer with its pool never matching: drafts from the row's own context only."""
    proposer = OuroborosProposer(vllm_config(k=4))
    proposer.drafter = PhraseChainDrafter(DraftSettings(k=4, step_budget=8, pool_match=99))
    return proposer


def test_the_comparison_can_fail_when_requests_share_nothing():
    """The bar above is not built in: on answers that share no phrases the pool has nothing to add."""
    rng = random.Random(3)
    answers = [[rng.randrange(100, 50_000) for _ in range(60)] for _ in range(16)]
    ouroboros = simulate(OuroborosProposer(vllm_config(k=4)), answers, 1)
    assert ouroboros < 1.3 * simulate(context_only(), answers, 1)


VLLM_RUN = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
if __name__ == "__main__":
    target, prompts, speculation = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    llm = LLM(model=target, dtype="float32", max_model_len=256, seed=0, enforce_eager=True,
              disable_log_stats=False, speculative_config=speculation or None)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    accepted = sum(m.value for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens")
    print("RESULT " + json.dumps({"rows": [list(o.outputs[0].token_ids) for o in outputs], "accepted": accepted}))
"""


@pytest.mark.skipif(not os.environ.get("OUROBOROS_VLLM_PYTHON"),
                    reason="set OUROBOROS_VLLM_PYTHON to a Python with vLLM (scripts/setup_vllm.sh makes one)")
def test_inside_real_vllm_greedy_output_is_vllms_own(tmp_path):
    """vLLM with the proposer gives the tokens vLLM gives without speculation (4 prompts together)."""
    from tiny_models import tiny_model, tiny_tokenizer

    from ouroboros.bench.vllm_peer import PROPOSER, _package_alone

    tokenizer, target = tiny_tokenizer(), tmp_path / "target"
    model = tiny_model("qwen2", seed=0, vocab=len(tokenizer), hidden=256)  # head size 64: vLLM's CPU attention
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    prompts = [[5, 6, 7, 8, 9, 5, 6, 7], [11, 12, 13, 11, 12], [20, 21, 22, 23, 24], [30, 31, 30, 31, 30]]
    env = dict(os.environ, PYTHONPATH=str(_package_alone(tmp_path / "path")), VLLM_CPU_KVCACHE_SPACE="1",
               HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    results = []
    for speculation in ({}, {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": 3}):
        done = subprocess.run([os.environ["OUROBOROS_VLLM_PYTHON"], "-c", VLLM_RUN, str(target), json.dumps(prompts),
                               json.dumps(speculation)], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        (line,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        results.append(json.loads(line.removeprefix("RESULT ")))
        if speculation:
            assert f"Loaded custom proposer class '{PROPOSER}'" in done.stdout + done.stderr
    plain, speculated = results
    assert speculated["rows"] == plain["rows"] and all(len(row) == 32 for row in plain["rows"])
    assert speculated["accepted"] > 0  # the proposer's drafts were verified and taken, not just empty


def test_under_load_only_strong_evidence_is_drafted(monkeypatch):
    """With more rows than the step budget gives k tokens each, a 2-token match or a phrase learned
    once is no longer drafted; a 3-token match still is."""
    monkeypatch.setenv(BUDGET_ENV, "8")
    proposer = OuroborosProposer(vllm_config(k=4))
    batch = Batch(rows=8)
    weak, strong = [5, 6, 1, 2, 9, 7, 8, 1, 2], [5, 6, 1, 2, 3, 9, 7, 8, 1, 2, 3]
    batch.put(0, weak)
    batch.put(1, strong)
    assert batch.call(proposer, [[2], [3]]) == [[9, 7, 8, 1], [9, 7, 8, 1]]  # two rows: 4 tokens each
    assert batch.call(proposer, [[2], [3]] + [[4]] * 6)[:2] == [[], [9]]  # eight rows: 1 token each, if strong
