"""The adaptive switches of issue 11 propose well: confident drafts run longer, a context that knows
its continuation skips the draft model, spare verify budget goes to likely branches, and the draft
model checks only likely phrases."""

import torch
from tiny_models import tiny_model

from ouroboros import OuroborosConfig, PhrasePool, generate
from ouroboros.acceptance import StepResult
from ouroboros.proposers import Context, DraftModelProposer, LookaheadProposer, NullProposer, Proposal
from ouroboros.proposers.draft_model import AcceptanceEstimate
from ouroboros.proposers.prompt_lookup import likely_continuation, suffix_matches
from ouroboros.runner import ModelRunner
from ouroboros.tree import ROOT, DraftTree

VOCAB = 61
PATTERN = [11, 12, 13, 14, 15, 16, 17, 18]


def proposer(runner=None, **switches) -> tuple[DraftModelProposer, PhrasePool]:
    config = OuroborosConfig(level=3, pool_size=4, **switches)
    pool = PhrasePool(level=3, capacity=4)
    return DraftModelProposer(runner, NullProposer(), pool, config, lengthen=True, harvest=True,
                              context_phrases=False), pool


def test_suffix_matches_find_the_longest_match():
    n, ends = suffix_matches(torch.tensor([5, 6, 7, 9, 5, 6]), 4)
    assert n == 2 and ends.tolist() == [2]
    n, ends = suffix_matches(torch.tensor([1, 2, 3, 9, 2, 3, 8, 1, 2, 3]), 8)
    assert n == 3 and ends.tolist() == [3]  # "1 2 3" beats the shorter "2 3" at 4
    assert suffix_matches(torch.tensor([1, 2, 3]), 4)[0] == 0


def test_likely_continuation_prefers_the_frequent_one():
    """After "7", 8 followed twice and 9 once (the latest): the frequent continuation wins."""
    tokens = torch.tensor([7, 8, 1, 7, 8, 2, 7, 9, 3, 7])
    assert likely_continuation(tokens, 4, 2) == (1, [8, 2])


def test_acceptance_estimate_learns_from_verdicts():
    estimate = AcceptanceEstimate()
    prior = estimate(0.97)
    assert 0.95 < prior < 0.98
    for _ in range(40):
        estimate.update(0.97, accepted=False)
    assert estimate(0.97) < 0.2 and estimate(0.5) != estimate(0.97)


def test_adaptive_length_drafts_further_when_confident():
    """The target as its own draft: where draft forwards are nearly free it drafts up to the cap,
    where they cost nearly a target forward it stops after the first unsure token; both drafts are
    the draft's own greedy chain."""
    model = tiny_model("llama", seed=0, vocab=VOCAB)
    context = Context(PATTERN * 2, 40)
    lengths = {}
    with torch.inference_mode():
        for cost in (1e-9, 0.99):
            drafting, _ = proposer(ModelRunner(model, role="draft"), adaptive_length=True, draft_cost=cost,
                                   draft_cap=10)
            drafted, confidence, runner_up = drafting.draft(context, room=39)
            assert len(drafted) == len(confidence) == len(runner_up)
            assert all(0 < p <= 1 for p in confidence) and all(a != b for a, b in zip(drafted, runner_up))
            lengths[cost] = drafted
    assert len(lengths[1e-9]) == 10 and len(lengths[0.99]) == 1
    assert lengths[1e-9][:1] == lengths[0.99]


def test_no_draft_forward_runs_past_what_the_target_will_verify():
    """A verify budget of 2 (where each extra verified token costs a target forward's worth, AVX2)
    leaves room for one drafted token: the draft model runs once, however confident it is."""
    model = tiny_model("llama", seed=0, vocab=VOCAB)
    runner = ModelRunner(model, role="draft")
    with torch.inference_mode():
        drafting, _ = proposer(runner, adaptive_length=True, draft_cost=1e-9, draft_cap=10, verify_budget=2,
                               draft_free=False)
        proposal = drafting.propose(Context(PATTERN * 2, 40))
    assert runner.forwards == 1 and len(proposal.trunk) == 1 and proposal.tree.size == 1
    drafting.pool.insert(proposal.tree.tokens[proposal.trunk[-1]], (3, 4))  # a branch for that trunk
    with torch.inference_mode():
        again = drafting.propose(Context(PATTERN * 2, 40))
    assert again.tree.size == 1 and not again.tried  # no room left in the target's forward for it
    roomy, _ = proposer(ModelRunner(model, role="draft"), adaptive_length=False, gamma=1, draft_free=False,
                        spread_branches=False)
    roomy.pool = drafting.pool
    with torch.inference_mode():
        assert roomy.propose(Context(PATTERN * 2, 40)).tried  # where there is room, it is tried


def test_the_estimate_is_calibrated_by_learn():
    drafting, _ = proposer()
    tree = DraftTree()
    trunk = tuple(tree.add_chain([1, 2, 3]))
    proposal = Proposal(tree, trunk=trunk, confidence=(0.99, 0.99, 0.99))
    before = drafting.estimate(0.99)
    drafting.learn(Context([0], 10), proposal, StepResult(emitted=[1, 5], path=[0], argmax=[1, 5, 0, 0]))
    assert drafting.estimate(0.99) < before  # token 2 was rejected; token 3 was never judged
    assert drafting.estimate.seen[-2] == AcceptanceEstimate().seen[-2] + 2


def test_draft_free_step_verifies_the_contexts_continuation_without_the_draft_model():
    """The context repeats an 8-token pattern: the step proposes its continuation, drafted by no
    model (the runner is None, so any draft forward would fail)."""
    drafting, _ = proposer(draft_free=True, free_match=4)
    proposal = drafting.propose(Context(PATTERN * 2 + PATTERN[:3], 30))
    tokens = proposal.tree.path_tokens(proposal.trunk)
    assert tokens[:5] == PATTERN[3:] and tokens[5:8] == PATTERN[:3]
    assert set(proposal.tree.sources[:len(tokens)]) == {"context"} and drafting.events["draft_free"] == 1


def test_spread_branches_fill_the_budget_with_the_likeliest_chains():
    """The draft was unsure only at its 2nd token: its runner-up there comes before runner-ups of
    sure tokens, then the pool's phrase after that runner-up; the tree stays within the budget."""
    drafting, pool = proposer(spread_branches=True, verify_budget=6, branches=0)
    pool.insert(40, (41, 42))
    tree = DraftTree(max_depth=20)
    trunk = tree.add_chain([30, 31, 32])
    drafting._spread(tree, Context([1, 2, 3], 21), trunk, [0.99, 0.3, 0.99], [50, 40, 52], [], 6)
    assert tree.size <= 5
    runner_up = tree.child(trunk[0], 40)
    assert runner_up is not None and tree.child(runner_up, 41) is not None
    assert tree.child(ROOT, 50) is None or tree.size == 5


def test_likely_phrases_check_the_contexts_continuation_and_repeated_pool_phrases():
    pool = PhrasePool(level=3, capacity=4)
    pool.insert(PATTERN[2], (90, 91))  # seen once: a guess
    pool.insert(PATTERN[2], (92, 93))
    pool.insert(PATTERN[2], (92, 93))  # seen twice
    config = OuroborosConfig(level=3, pool_size=4, step_phrases=2, likely_phrases=True, draft_cap=6)
    tree = LookaheadProposer(pool, config, seed=[1]).propose(Context(PATTERN * 2 + PATTERN[:3], 30)).tree
    assert tree.path_tokens(range(6)) == PATTERN[3:] + PATTERN[:1]
    assert (92, 93) in [tuple(tree.tokens[i:i + 2]) for i in range(tree.size)]
    assert 90 not in tree.tokens
    plain = LookaheadProposer(pool, config.classic(), seed=[1])
    assert plain.propose(Context(PATTERN * 2 + PATTERN[:3], 30)).tree.tokens == [92, 93, 90, 91]


def test_calibration_lengthens_the_drafts_of_an_always_right_draft():
    """The target as its own draft is always right but unsure (a tiny random model): adaptive
    drafts start short, and grow as the estimate learns that such tokens are accepted anyway."""
    model = tiny_model("llama", seed=0, vocab=VOCAB)
    config = OuroborosConfig(adaptive_length=True, draft_free=False, spread_branches=False, likely_phrases=False,
                             draft_cap=8, draft_cost=0.2)
    out = generate(model, torch.tensor([PATTERN * 2]), draft=model, max_new_tokens=60, eos_token_id=[],
                   config=config)
    lengths = out.stats.accept_lengths
    assert "trunk_partial" not in out.stats.events
    late = lengths[len(lengths) // 2:]
    assert sum(late) / len(late) > 1.5 * sum(lengths[:3]) / 3
