"""Every method returns exactly the target's greedy `generate` output (fp32 tiny random models)."""

from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import perturbed, tiny_model

from ouroboros import METHODS, OuroborosConfig, PhrasePool, generate

VOCAB = 61


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def models(request):
    target = tiny_model(request.param, seed=0, vocab=VOCAB)
    return {
        "target": target,
        "other": tiny_model(request.param, seed=7, vocab=VOCAB),
        "same": target,
        "perturbed": perturbed(target, scale=0.05),
    }


def reference(target, ids, max_new_tokens, eos=None):
    """HF greedy generate (an explicit all-ones attention mask: the prompt may contain the pad id)."""
    return target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                           eos_token_id=eos, pad_token_id=0, repetition_penalty=1.0)


def prompt(seed, length=12, vocab=VOCAB):
    """Prompts with repetition, so that prompt lookup and context phrases find matches."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, vocab, (length // 2,), generator=g)
    return torch.cat([base, base[: length - len(base)]])[None]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("draft_kind", ["other", "same", "perturbed"])
def test_methods_match_greedy_generate(models, method, draft_kind):
    target, draft = models["target"], models[draft_kind]
    for seed in range(3):
        ids = prompt(seed)
        ref = reference(target, ids, 40)
        out = generate(target, ids, draft=draft, method=method, max_new_tokens=40, eos_token_id=[])
        assert torch.equal(out.sequences, ref), (method, draft_kind, seed)
        assert out.stats.new_tokens == 40 == sum(out.stats.accept_lengths)
        assert out.stats.target_forwards == len(out.stats.accept_lengths)


@pytest.mark.parametrize("method", METHODS)
def test_eos_inside_output_stops_where_greedy_does(models, method):
    target, draft = models["target"], models["perturbed"]
    ids = prompt(3)
    free = reference(target, ids, 30)[0, ids.shape[1]:].tolist()
    first_eos, second_eos = free[9], free[4]  # the earlier one must win
    ref = reference(target, ids, 30, eos=[first_eos, second_eos])
    out = generate(target, ids, draft=draft, method=method, max_new_tokens=30, eos_token_id=[first_eos, second_eos])
    assert torch.equal(out.sequences, ref)
    assert out.sequences[0, -1].item() in (first_eos, second_eos)
    assert out.finish_reason == "stop"
    assert out.stats.new_tokens == out.sequences.shape[1] - ids.shape[1]


def test_generation_config_eos_is_the_default(models):
    target = tiny_model("llama", seed=0, vocab=VOCAB)
    ids = prompt(4)
    eos = reference(target, ids, 20)[0, ids.shape[1] + 6].item()
    target.generation_config.eos_token_id = eos
    out = generate(target, ids, draft=models["perturbed"], max_new_tokens=20)
    expected = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                               pad_token_id=0)
    assert torch.equal(out.sequences, expected)
    assert out.sequences[0, -1].item() == eos


def test_lengths_1_to_200(models):
    target, draft = models["target"], models["perturbed"]
    ids = prompt(5)
    ref = reference(target, ids, 200)
    for n in (1, 2, 3, 7, 64, 200):
        for method in METHODS:
            out = generate(target, ids, draft=draft, method=method, max_new_tokens=n, eos_token_id=[])
            assert torch.equal(out.sequences, ref[:, : ids.shape[1] + n]), (method, n)


def test_every_acceptance_path_is_exercised(models):
    """Draft = slightly perturbed target, pool pre-seeded with right and wrong phrases: all paths
    (full trunk, partial trunk, branch accepted, branch rejected, draft-side phrase accepted) occur,
    and the output is still exactly greedy."""
    target, draft = models["target"], models["perturbed"]
    events = Counter()
    config = OuroborosConfig(gamma=3, window=3, level=3, pool_size=4, step_phrases=2, branches=2)
    for seed in range(4):
        ids = prompt(seed)
        ref = reference(target, ids, 60)
        pool = PhrasePool(level=3, capacity=4)
        pool.insert_ngrams(ref[0, : ids.shape[1] + 30].tolist())  # right phrases for the first half
        for key in range(VOCAB):  # then a wrong phrase for every key, newest, so it is tried first
            pool.insert(key, [(key + 1) % VOCAB, (key + 2) % VOCAB])
        out = generate(target, ids, draft=draft, max_new_tokens=60, eos_token_id=[], config=config, pool=pool)
        assert torch.equal(out.sequences, ref)
        events.update(out.stats.events)
    for path in ("trunk_full", "trunk_partial", "branch_accepted", "branch_rejected", "phrase_accepted"):
        assert events[path] > 0, (path, events)


def test_warm_pool_is_reused_and_stays_exact(models):
    target, draft = models["target"], models["perturbed"]
    pool = PhrasePool(level=4, capacity=8)
    ids = prompt(6)
    ref = reference(target, ids, 50)
    cold = generate(target, ids, draft=draft, max_new_tokens=50, eos_token_id=[], pool=pool)
    assert len(pool) > 0
    warm = generate(target, ids, draft=draft, max_new_tokens=50, eos_token_id=[], pool=pool)
    assert torch.equal(cold.sequences, ref) and torch.equal(warm.sequences, ref)
    assert warm.stats.target_forwards <= cold.stats.target_forwards


configs = st.builds(
    OuroborosConfig,
    gamma=st.integers(1, 8),
    window=st.integers(1, 5),
    level=st.integers(2, 6),
    pool_size=st.integers(2, 6),
    step_phrases=st.integers(0, 2),
    branches=st.integers(0, 2),
    max_ngram=st.integers(1, 4),
    phrase_drafting=st.booleans(),
    lengthen=st.booleans(),
    harvest=st.booleans(),
    context_phrases=st.booleans(),
    adaptive_length=st.booleans(),
    draft_cost=st.floats(0.05, 0.95),
    draft_cap=st.integers(1, 12),
    draft_free=st.booleans(),
    free_match=st.integers(1, 5),
    spread_branches=st.booleans(),
    verify_budget=st.integers(2, 20),
    likely_phrases=st.booleans(),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=configs, seed=st.integers(0, 10_000), n=st.integers(1, 48),
       method=st.sampled_from(METHODS), draft_kind=st.sampled_from(["other", "same", "perturbed"]))
def test_property_any_config_is_exact(models, config, seed, n, method, draft_kind):
    target = models["target"]
    ids = prompt(seed, length=4 + seed % 12)
    ref = reference(target, ids, n)
    out = generate(target, ids, draft=models[draft_kind], method=method, max_new_tokens=n, eos_token_id=[],
                   config=config)
    assert torch.equal(out.sequences, ref)
