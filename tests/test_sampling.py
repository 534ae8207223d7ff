"""Sampling is exact: each method's outputs have the target's own sampling distribution.

Tiny fp32 models over a 12-token vocabulary; the exact distribution over all 12^3 continuations is
enumerated from the target, and empirical frequencies are checked with a chi-square test at a fixed
significance and fixed seeds (so the test is deterministic). A deliberately biased verifier shows
the test can fail.
"""

import itertools
from collections import Counter

import pytest
import torch
from tiny_models import perturbed, tiny_model

import ouroboros.request as request
from ouroboros import METHODS, OuroborosConfig, PhrasePool, generate
from ouroboros.acceptance import Sampler, _walk
from ouroboros.batch_generation import generate_batch

VOCAB, NEW, DRAWS, ALPHA = 12, 3, 800, 1e-3
PROMPT = torch.tensor([[1, 2, 3, 1, 2]])
SETTINGS = {
    "t1": dict(temperature=1.0),
    "t0.5": dict(temperature=0.5),
    "topk": dict(temperature=1.0, top_k=3),
    "topp": dict(temperature=1.0, top_p=0.9),
}
CONFIG = OuroborosConfig(gamma=1, window=2, level=3, pool_size=3, step_phrases=2, branches=2).classic()
# Without draft-side phrases the trunk stays short, leaving room under the 3-token budget for branches.
BRANCHY = OuroborosConfig(gamma=1, window=2, level=3, pool_size=3, step_phrases=0, branches=3).classic()
# Every adaptive switch on, drafts cut short by a costly draft and a tight budget, so that
# runner-up and context branches and draft-free steps all happen within 3 new tokens.
ADAPTIVE = OuroborosConfig(window=2, level=3, pool_size=3, step_phrases=2, branches=1, draft_cost=0.9,
                           draft_cap=2, free_match=2, verify_budget=5)


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", seed=3, vocab=VOCAB, hidden=32)
    with torch.no_grad():
        target.lm_head.weight.mul_(12.0)  # peaked distributions: drafts are often right, not always
    return target, perturbed(target, scale=0.3, seed=5)


def exact_distribution(target, settings) -> dict[tuple[int, ...], float]:
    """P(continuation) for every continuation of NEW tokens, by enumeration."""
    sampler = Sampler(**settings)
    prefixes = torch.tensor(list(itertools.product(range(VOCAB), repeat=NEW - 1)))
    ids = torch.cat([PROMPT.expand(len(prefixes), -1), prefixes], dim=1)
    with torch.no_grad():
        logits = target(ids).logits[:, -NEW:]
    probs = sampler.probabilities(logits.reshape(-1, VOCAB)).reshape(len(prefixes), NEW, VOCAB)
    table = {}
    for row, prefix in enumerate(prefixes.tolist()):
        for last in range(VOCAB):
            seq = prefix + [last]
            p = probs[row, 0, seq[0]] * probs[row, 1, seq[1]] * probs[row, 2, last]
            table[tuple(seq)] = float(p)
    return table


def chi_square_p_value(counts: Counter, table: dict, draws: int) -> float:
    """Pearson chi-square over outcomes with expected count >= 5; rarer ones pooled in one bin.
    An outcome of probability 0 that was drawn at all fails outright."""
    if any(table[outcome] == 0 for outcome in counts):
        return 0.0
    stat, bins, rare_expected, rare_seen = 0.0, 0, 0.0, 0
    for outcome, p in table.items():
        expected = p * draws
        if expected >= 5:
            stat += (counts[outcome] - expected) ** 2 / expected
            bins += 1
        else:
            rare_expected += expected
            rare_seen += counts[outcome]
    if rare_expected > 0:
        stat += (rare_seen - rare_expected) ** 2 / rare_expected
        bins += 1
    dof = bins - 1
    if dof == 0:  # a single possible outcome, and (checked above) nothing else was drawn
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(stat / 2)))


def seeded_phrases(target) -> list[tuple[int, list[int]]]:
    """For every key token, the target's greedy 2 tokens after PROMPT + key: likely, not certain."""
    phrases = []
    for key in range(VOCAB):
        ids = torch.cat([PROMPT, torch.tensor([[key]])], dim=1)
        out = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=2,
                              pad_token_id=0)
        phrases.append((key, out[0, -2:].tolist()))
    return phrases


def draw(target, draft, method, settings, draws=DRAWS, config=CONFIG):
    counts, events = Counter(), Counter()
    phrases = seeded_phrases(target)
    for seed in range(draws):
        pool = PhrasePool(level=3, capacity=3)
        for key, phrase in phrases:
            pool.insert(key, phrase)
        out = generate(target, PROMPT, draft=draft, method=method, max_new_tokens=NEW, eos_token_id=[],
                       config=config, pool=pool, do_sample=True, seed=10_000 + seed, **settings)
        counts[tuple(out.sequences[0, PROMPT.shape[1]:].tolist())] += 1
        events.update(out.stats.events)
    return counts, events


@pytest.mark.parametrize("method", METHODS)
def test_methods_sample_the_target_distribution(pair, method):
    target, draft = pair
    settings_list = list(SETTINGS) if method == "ouroboros" else ["t1"]
    events = Counter()
    for name in settings_list:
        table = exact_distribution(target, SETTINGS[name])
        config = BRANCHY if name == "topk" else CONFIG
        counts, seen = draw(target, draft, method, SETTINGS[name], config=config)
        p_value = chi_square_p_value(counts, table, DRAWS)
        assert p_value > ALPHA, (method, name, p_value)
        events.update(seen)
    if method == "ouroboros":
        for path in ("trunk_full", "trunk_partial", "branch_accepted", "branch_rejected", "phrase_accepted"):
            assert events[path] > 0, (path, events)


def test_adaptive_drafts_sample_the_target_distribution(pair):
    """Adaptive drafts depend on past verdicts (calibration) and on the context (draft-free steps),
    never on the sample being drawn: the output distribution is still the target's."""
    target, draft = pair
    events = Counter()
    for name in ("t1", "topk"):
        counts, seen = draw(target, draft, "ouroboros", SETTINGS[name], config=ADAPTIVE)
        assert chi_square_p_value(counts, exact_distribution(target, SETTINGS[name]), DRAWS) > ALPHA, name
        events.update(seen)
    for path in ("trunk_full", "trunk_partial", "draft_free", "spread_accepted"):
        assert events[path] > 0, (path, events)


class Biased(Sampler):
    """Accepts a drafted token whenever the target gives it >= 20% (instead of sampling)."""

    def verify(self, tree, logits):
        def choose(row):
            probs = self.probabilities(logits[row][None])[0]
            node = row - 1
            children = tree._children.get(node if node >= 0 else -1, {})
            for token in children:
                if probs[token] >= 0.2:
                    return token
            return int(torch.multinomial(probs, 1, generator=self.generator))
        return _walk(tree, choose, logits.argmax(dim=-1).tolist())


@pytest.mark.parametrize("batched", [False, True])
def test_a_biased_verifier_is_caught(pair, monkeypatch, batched):
    """The biased verifier skews the output; the chi-square test must reject it, one row at a time
    and in a batch."""
    target, draft = pair
    monkeypatch.setattr(request, "Sampler", Biased)
    table = exact_distribution(target, SETTINGS["t1"])
    counts, _ = (draw_batched if batched else draw)(target, draft, "ouroboros", SETTINGS["t1"])
    monkeypatch.undo()
    assert chi_square_p_value(counts, table, DRAWS) < ALPHA


def draw_batched(target, draft, method, settings, rows=8, size_by_load=False):
    """DRAWS samples as batches of `rows` copies of PROMPT (row i samples with seed + i)."""
    counts, events = Counter(), Counter()
    phrases = seeded_phrases(target)
    for batch in range(DRAWS // rows):
        pool = PhrasePool(level=3, capacity=3)
        for key, phrase in phrases:
            pool.insert(key, phrase)
        out = generate_batch(target, PROMPT.expand(rows, -1).tolist(), draft=draft, method=method,
                             max_new_tokens=NEW, eos_token_id=[], config=CONFIG, pool=pool, do_sample=True,
                             seed=20_000 + rows * batch, size_by_load=size_by_load, **settings)
        counts.update(tuple(row) for row in out.sequences[:, PROMPT.shape[1]:].tolist())
        for stats in out.stats:
            events.update(stats.events)
    return counts, events


@pytest.mark.parametrize("method, rows", [("ouroboros", 8), ("auto", 2)])
def test_batched_rows_sample_the_target_distribution(pair, method, rows):
    """Rows verified together in one forward, each with its own sampler: every row still draws from
    the target's distribution. `ouroboros` unsized drafts every step; `auto` is sized by this
    machine's measured batch costs (at 2 rows of these tiny models it was seen to draft, at 8 not),
    so whether it drafts is not asserted."""
    target, draft = pair
    for name in ("t1", "topp"):
        counts, events = draw_batched(target, draft, method, SETTINGS[name], rows=rows, size_by_load=method == "auto")
        assert sum(counts.values()) == DRAWS
        assert chi_square_p_value(counts, exact_distribution(target, SETTINGS[name]), DRAWS) > ALPHA, (method, name)
        if method == "ouroboros":
            assert events["trunk_full"] > 0 and events["trunk_partial"] > 0 and events["phrase_accepted"] > 0, events


def test_same_seed_same_output_and_methods_agree(pair):
    """Each emitted token consumes exactly one draw, so a seed fixes the output, whatever the method."""
    target, draft = pair
    ids = torch.tensor([[4, 5, 6, 4, 5, 6]])
    outputs = {m: generate(target, ids, draft=draft, method=m, max_new_tokens=30, eos_token_id=[], do_sample=True,
                           temperature=0.7, top_p=0.9, seed=42).sequences for m in METHODS}
    again = generate(target, ids, draft=draft, max_new_tokens=30, eos_token_id=[], do_sample=True, temperature=0.7,
                     top_p=0.9, seed=42).sequences
    assert torch.equal(outputs["ouroboros"], again)
    for m in METHODS:
        assert torch.equal(outputs[m], outputs["vanilla"]), m
    other = generate(target, ids, draft=draft, max_new_tokens=30, eos_token_id=[], do_sample=True, temperature=0.7,
                     top_p=0.9, seed=43).sequences
    assert not torch.equal(other, again)


def test_temperature_zero_is_greedy(pair):
    target, draft = pair
    greedy = generate(target, PROMPT, draft=draft, max_new_tokens=10, eos_token_id=[])
    with pytest.warns(UserWarning, match="temperature 0 wins"):
        zero = generate(target, PROMPT, draft=draft, max_new_tokens=10, eos_token_id=[], do_sample=True,
                        temperature=0)
    assert torch.equal(greedy.sequences, zero.sequences)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(seed="x"), "seed"),
])
def test_bad_sampling_values(pair, kwargs, message):
    target, draft = pair
    with pytest.raises((ValueError, TypeError), match=message):
        generate(target, PROMPT, draft=draft, max_new_tokens=4, do_sample=True, **kwargs)


def test_nan_logits_are_an_error():
    target = tiny_model("llama", seed=1, vocab=VOCAB)
    with torch.no_grad():
        target.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        generate(target, PROMPT, method="vanilla", max_new_tokens=4, do_sample=True, seed=0)
