"""One registry of methods: a new method is one entry, and generate, the CLI and the bench see it."""

from collections import Counter

import pytest
import torch
from tiny_models import tiny_model

from ouroboros import METHODS, InvalidArgumentError, Method, generate, register
from ouroboros.methods import get_method, unregister
from ouroboros.proposers import Proposal, Proposer
from ouroboros.tree import DraftTree


class RepeatLastToken:
    """A toy proposer: drafts the last token three times."""

    draft_runner = None

    def __init__(self):
        self.events = Counter()

    def propose(self, context):
        tree = DraftTree(max_depth=context.remaining - 1)
        tree.add_chain([context.tokens[-1]] * 3, source="toy")
        return Proposal(tree)

    def learn(self, context, proposal, result):
        self.events["toy_steps"] += 1


@pytest.fixture
def toy_method():
    method = register(Method("repeat_last", lambda setup: RepeatLastToken(), summary="toy"))
    yield method
    unregister(method.name)


def test_a_registered_method_runs_exactly_and_is_offered_everywhere(toy_method):
    assert isinstance(RepeatLastToken(), Proposer) and "repeat_last" in METHODS
    target = tiny_model("llama", seed=0, vocab=61)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    ref = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=30,
                          eos_token_id=None, pad_token_id=0)
    out = generate(target, ids, method="repeat_last", max_new_tokens=30, eos_token_id=[])
    assert torch.equal(out.sequences, ref)
    assert out.stats.events["toy_steps"] == out.stats.target_forwards

    from ouroboros.cli import build_parser
    args = build_parser().parse_args(["generate", "--method", "repeat_last", "hi"])
    assert args.method == "repeat_last"
    from ouroboros.bench import engine_methods
    assert "repeat_last" in engine_methods()


def test_unknown_methods_and_duplicates_are_refused():
    with pytest.raises(InvalidArgumentError, match="unknown method 'nope'"):
        get_method("nope")
    with pytest.raises(InvalidArgumentError, match="already registered"):
        register(Method("vanilla", lambda setup: None))
