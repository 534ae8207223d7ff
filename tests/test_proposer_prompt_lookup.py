"""Prompt lookup proposes the continuation of the latest earlier match, and it pays on repetition."""

import torch
from tiny_models import tiny_model

from ouroboros import generate
from ouroboros.proposers import Context, PromptLookupProposer


def drafted(proposer, tokens, remaining=100):
    tree = proposer.propose(Context(tokens, remaining)).tree
    return tree.tokens, tree.sources


def test_the_docstring_example():
    assert drafted(PromptLookupProposer(gamma=2, max_ngram=2), [5, 6, 7, 9, 5, 6]) == ([7, 9], ["context", "context"])


def test_longest_match_wins_and_latest_occurrence_is_used():
    tokens = [1, 2, 3, 8, 9, 2, 3, 4, 4, 1, 2, 3]
    # (1, 2, 3) occurred at 0 -> 8 9; the shorter (2, 3) also at 5 -> 4 4, but 3-grams come first
    assert drafted(PromptLookupProposer(gamma=2, max_ngram=3), tokens)[0] == [8, 9]
    assert drafted(PromptLookupProposer(gamma=2, max_ngram=2), tokens)[0] == [4, 4]


def test_no_match_and_budget():
    assert drafted(PromptLookupProposer(gamma=3, max_ngram=3), [1, 2, 3, 4])[0] == []
    assert drafted(PromptLookupProposer(gamma=5, max_ngram=1), [1, 2, 3, 1], remaining=3)[0] == [2, 3]


def test_accepts_several_tokens_per_forward_when_the_output_repeats_the_prompt():
    """A tiny model whose greedy output falls into a cycle: prompt lookup then drafts whole cycles."""
    target = tiny_model("llama", seed=0, vocab=61)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    plain = generate(target, ids, method="vanilla", max_new_tokens=80, eos_token_id=[])
    lookup = generate(target, ids, method="prompt_lookup", max_new_tokens=80, eos_token_id=[])
    assert torch.equal(plain.sequences, lookup.sequences)
    assert plain.stats.mean_accepted == 1.0
    assert lookup.stats.mean_accepted > 1.5
    assert lookup.stats.events["lookup_accepted"] > 0
