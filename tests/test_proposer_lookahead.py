"""Lookahead (Jacobi) drafting: the window turns into phrases, and pool phrases get accepted."""

import torch
from tiny_models import tiny_model

from ouroboros import OuroborosConfig, PhrasePool, generate
from ouroboros.acceptance import greedy_verify
from ouroboros.proposers import Context, LookaheadProposer
from ouroboros.runner import ModelRunner, decode_step


def test_pool_phrases_of_the_root_are_proposed_newest_first():
    pool = PhrasePool(level=4, capacity=4)
    pool.insert(7, (8, 9, 10))
    pool.insert(7, (1, 2, 3))
    proposer = LookaheadProposer(pool, OuroborosConfig(window=1, step_phrases=2).classic(), seed=[7])
    tree = proposer.propose(Context([5, 7], 100)).tree
    assert tree.tokens == [1, 2, 3, 8, 9, 10] and set(tree.sources) == {"pool"}


def test_the_window_fills_the_pool_with_the_models_own_ngrams():
    """After level-1 steps the window completes one n-gram per column each step; with a window on
    the target, phrases the pool learns come true later, so lookahead accepts > 1 token/forward."""
    target = tiny_model("llama", seed=0, vocab=61)
    config = OuroborosConfig(window=4, level=3, step_phrases=4, pool_size=8)
    pool = PhrasePool(level=3, capacity=8)
    proposer = LookaheadProposer(pool, config, seed=[3, 1, 4, 1])
    runner, tokens = ModelRunner(target), [3, 1, 4, 1]
    with torch.inference_mode():
        for _ in range(6):
            context = Context(tokens, 100)
            proposal = proposer.propose(context)
            result = decode_step(runner, tokens, proposal.tree, greedy_verify)
            proposer.learn(context, proposal, result)
            tokens = tokens + result.emitted
    assert len(pool) >= config.window
    out = generate(target, torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]]), method="lookahead", max_new_tokens=80,
                   eos_token_id=[], config=config)
    assert out.stats.mean_accepted > 1.2
    assert out.stats.events["phrase_accepted"] > 0
