"""The draft-model proposer (speculative and Ouroboros): it drafts well, and learns what it should."""

import torch
from tiny_models import perturbed, tiny_model

from ouroboros import OuroborosConfig, PhrasePool, generate
from ouroboros.acceptance import StepResult
from ouroboros.proposers import Context, DraftModelProposer, NullProposer, Proposal
from ouroboros.tree import DraftTree

VOCAB = 61


def make_learner(level=3):
    pool = PhrasePool(level=level, capacity=4)
    proposer = DraftModelProposer(runner=None, drafter=NullProposer(), pool=pool,
                                  config=OuroborosConfig(level=level, pool_size=4),
                                  lengthen=True, harvest=True, context_phrases=False)
    return proposer, pool


def test_harvest_from_a_rejected_tail():
    """Trunk a b c d e; the target rejects from b. Its argmax over the tail (b c d e) is (c d X Y):
    from b: t = c (draft agreed: next drafted is c), d -> phrase pool[b] = (c, d); from c: (d, X)
    since the draft had d after c; from d: X != e stops the run."""
    proposer, pool = make_learner()
    a, b, c, d, e, x, y, z = range(1, 9)
    tree = DraftTree()
    proposal = Proposal(tree, trunk=tuple(tree.add_chain([a, b, c, d, e])))
    argmax = [a, z, c, d, x, y]  # root, then nodes a..e: rejects b (wanted z)
    result = StepResult(emitted=[a, z], path=[0], argmax=argmax)
    proposer.learn(None, proposal, result)
    assert pool.lookup(b, 4) == [(c, d)]
    assert pool.lookup(c, 4) == [(d, x)]
    assert pool.lookup(d, 4) == [] and pool.lookup(e, 4) == []


def test_tried_branches_are_replaced_by_the_targets_correction():
    proposer, pool = make_learner()
    pool.insert(7, (1, 2))
    pool.insert(7, (3, 4))
    tree = DraftTree()
    trunk = tuple(tree.add_chain([6, 7]))
    tried = (((3, 4), tuple(tree.add_chain([3, 4], parent=1))), ((1, 2), tuple(tree.add_chain([1, 2], parent=1))))
    proposal = Proposal(tree, trunk=trunk, tried=tried)
    # argmax rows: root, 6, 7 (bonus 3), branch nodes 3 -> 5, 4 -> 0, 1 -> 0, 2 -> 0
    argmax = [6, 7, 3, 5, 0, 0, 0]
    result = StepResult(emitted=[6, 7, 3, 5], path=[0, 1, 2], argmax=argmax)
    proposer.learn(None, proposal, result)
    assert (7, (3, 5)) in pool  # (bonus, argmax after 3)
    assert (7, (3, 0)) in pool  # (bonus, argmax after 1)
    assert (7, (1, 2)) not in pool and (7, (3, 4)) not in pool
    assert proposer.events["branch_accepted"] == 1


def repeated_prompt(seed: int = 3, length: int = 8, copies: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (length,), generator=g).repeat(copies)[None]


def test_speculative_with_the_target_as_draft_accepts_gamma_plus_one():
    """A draft identical to the target is always right: every target forward after the prefill
    emits the whole trunk plus the target's own next token."""
    target = tiny_model("llama", seed=0, vocab=VOCAB)
    for gamma in (1, 3, 5):
        out = generate(target, repeated_prompt(), draft=target, method="speculative", max_new_tokens=36,
                       eos_token_id=[], config=OuroborosConfig(gamma=gamma))
        lengths = out.stats.accept_lengths
        assert all(n == gamma + 1 for n in lengths[:-1]), (gamma, lengths)
        assert out.stats.events["trunk_full"] >= len(lengths) - 1 and "trunk_partial" not in out.stats.events


def test_speculative_with_an_unrelated_draft_emits_about_one_token_per_forward():
    """The contrast that shows the test above can fail: a random draft is rarely right."""
    target = tiny_model("llama", seed=0, vocab=VOCAB)
    other = tiny_model("llama", seed=7, vocab=VOCAB)
    out = generate(target, repeated_prompt(), draft=other, method="speculative", max_new_tokens=36,
                   eos_token_id=[], config=OuroborosConfig(gamma=3))
    assert out.stats.mean_accepted < 1.5


def test_ouroboros_warm_pool_accepts_more_than_cold_on_a_repeated_prompt():
    target = tiny_model("llama", seed=0, vocab=VOCAB)
    draft = perturbed(target, scale=0.05, seed=2)  # mostly right, so the trunk is often accepted whole
    config = OuroborosConfig(gamma=2, branches=2, pool_size=8)
    pool = PhrasePool(level=config.level, capacity=config.pool_size)
    ids = repeated_prompt(seed=5)
    cold = generate(target, ids, draft=draft, max_new_tokens=60, eos_token_id=[], config=config, pool=pool)
    warm = generate(target, ids, draft=draft, max_new_tokens=60, eos_token_id=[], config=config, pool=pool)
    assert torch.equal(cold.sequences, warm.sequences)
    assert warm.stats.mean_accepted > cold.stats.mean_accepted
    assert warm.stats.events.get("branch_accepted", 0) > cold.stats.events.get("branch_accepted", 0)


def test_harvesting_learns_phrases_from_rejected_drafts():
    """With only harvesting on, every phrase in the pool came from the target's verdicts on rejected
    draft tails (the rules are unit-tested above); with it off, nothing is learned."""
    target = tiny_model("llama", seed=0, vocab=VOCAB)
    draft = perturbed(target, scale=0.5, seed=3)
    base = dict(phrase_drafting=False, lengthen=False, context_phrases=False, gamma=4, level=3)
    learned = {}
    for harvest in (True, False):
        pool = PhrasePool(level=3, capacity=8)
        out = generate(target, repeated_prompt(seed=6), draft=draft, max_new_tokens=60, eos_token_id=[],
                       config=OuroborosConfig(harvest=harvest, **base), pool=pool)
        assert out.stats.events["trunk_partial"] > 0
        learned[harvest] = len(pool)
    assert learned[True] > 0 and learned[False] == 0


def test_forward_log_records_both_models():
    target = tiny_model("llama", seed=0, vocab=VOCAB)
    draft = perturbed(target, scale=0.05)
    ids = repeated_prompt()
    out = generate(target, ids, draft=draft, max_new_tokens=20, eos_token_id=[])
    log = out.stats.forward_log
    assert [r.model for r in log].count("target") == out.stats.target_forwards
    assert [r.model for r in log].count("draft") == out.stats.draft_forwards > 0
    first = next(r for r in log if r.model == "target")
    assert first.cached == 0 and first.fed >= ids.shape[1]
    assert all(r.seconds > 0 for r in log)
    assert [r.started for r in log] == sorted(r.started for r in log)


class NoForwards:
    """A draft runner that must not be used."""

    def __getattr__(self, name):
        raise AssertionError(f"the draft model was asked for {name}")


def test_without_the_draft_model_it_proposes_the_contexts_continuation_or_a_pool_phrase():
    """A batch's load sizing may forbid draft forwards (Context.draft_model False): the trunk is then
    the context's own continuation where a suffix of 2+ tokens matches, else the pool's phrase for
    the last token, else nothing; the node budget holds, and the draft model is never run."""
    pool = PhrasePool(level=3, capacity=4)
    proposer = DraftModelProposer(runner=NoForwards(), drafter=NullProposer(), pool=pool,
                                  config=OuroborosConfig(level=3, pool_size=4), lengthen=True, harvest=True,
                                  context_phrases=False)
    repeated = [5, 6, 7, 8, 9, 5, 6]  # "5 6" seen before: 7 8 9 follows
    proposal = proposer.propose(Context(repeated, 100, nodes=2, draft_model=False))
    assert [proposal.tree.tokens[node] for node in proposal.trunk] == [7, 8] and proposal.tree.size <= 2
    pool.insert(4, (11, 12))
    proposal = proposer.propose(Context([1, 2, 3, 4], 100, nodes=3, draft_model=False))
    assert [proposal.tree.tokens[node] for node in proposal.trunk] == [11, 12]
    assert proposer.propose(Context([1, 2, 3, 13], 100, nodes=3, draft_model=False)).tree.size == 0
