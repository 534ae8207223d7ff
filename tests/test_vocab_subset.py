"""The draft's output layer over a subset of ids (`vocab_subset`): which ids, logits that match the
full layer's on them on every runner, and output that stays exactly the target's."""

import json
import os

import pytest
import torch
from tiny_models import tiny_model

import ouroboros.aot as aot
from ouroboros import generate
from ouroboros.engine import Engine
from ouroboros.runner import ModelRunner
from ouroboros.static_runner import StaticRunner
from ouroboros.tree import DraftTree
from ouroboros.vocab_subset import vocab_subset

VOCAB = 512
SIZE = 64


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("qwen2", seed=31, vocab=VOCAB, eos_token_id=300)
    draft = tiny_model("qwen2", seed=32, vocab=VOCAB, eos_token_id=300)
    return target, draft


def test_the_subset_is_the_lowest_ids_and_the_special_ones(pair):
    subset = vocab_subset(pair[1], SIZE)
    assert subset.ids.tolist() == list(range(SIZE)) + [300]
    assert subset.vocab == VOCAB and subset.head(pair[1])[0].shape == (SIZE + 1, pair[1].config.hidden_size)


def test_no_subset_where_it_would_save_little_or_is_asked_off(pair):
    assert vocab_subset(pair[1], VOCAB // 2 + 1) is None  # would keep over half of the layer
    assert vocab_subset(pair[1], 0) is None and vocab_subset(pair[1], None) is None
    capped = tiny_model("qwen2", seed=33, vocab=VOCAB)
    capped.config.final_logit_softcapping = 30.0  # the head is not a plain linear layer any more
    assert vocab_subset(capped, SIZE) is None


def _forward(runner, tokens):
    tree = DraftTree()
    tree.add_chain([5, 6, 7])
    with torch.inference_mode():
        return runner.forward(runner.rewind(tokens), tree)


@pytest.mark.parametrize("make", [lambda m, s: ModelRunner(m, role="draft", subset=s),
                                  lambda m, s: StaticRunner(m, role="draft", subset=s)], ids=["eager", "static"])
def test_logits_are_the_full_layers_on_the_subset_and_minus_inf_elsewhere(pair, make):
    draft = pair[1]
    subset = vocab_subset(draft, SIZE)
    tokens = [1, 2, 3, 400, 4]
    full = _forward(ModelRunner(draft, role="draft"), tokens)
    sub = _forward(make(draft, subset), tokens)
    assert sub.shape == full.shape
    inside = subset.ids
    torch.testing.assert_close(sub[:, inside], full[:, inside], rtol=1e-4, atol=1e-5)
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[inside] = False
    assert torch.isneginf(sub[:, outside]).all()


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """A fresh folder for compiled packages (the fast path on the CPU)."""
    folder = tmp_path_factory.mktemp("compiled")
    old = os.environ.get(aot.CACHE_ENV)
    os.environ[aot.CACHE_ENV] = str(folder)
    yield folder
    if old is None:
        del os.environ[aot.CACHE_ENV]
    else:
        os.environ[aot.CACHE_ENV] = old


def _reference(target, prompt, tokens):
    return target.generate(prompt, max_new_tokens=tokens, do_sample=False, eos_token_id=None)[:, prompt.shape[1]:]


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "package"])
@pytest.mark.parametrize("method", ["speculative", "ouroboros", "auto"])
def test_output_is_the_targets_greedy_decoding(pair, packages, method, fast):
    target, draft = pair
    engine = Engine(target, draft, fast=fast, draft_vocab=SIZE, cache_dir=packages)
    for prompt in PROMPTS:
        out = generate(target, prompt, draft=draft, method=method, max_new_tokens=40, eos_token_id=[], engine=engine)
        assert out.sequences[:, prompt.shape[1]:].tolist() == _reference(target, prompt, 40).tolist(), method
    runner = engine.runner("draft")
    assert runner.subset is engine.subsets["draft"] is not None and engine.subsets["target"] is None


def test_the_package_computes_the_subsets_logits_only(pair, packages):
    draft = pair[1]
    subset = vocab_subset(draft, SIZE)
    tokens = [1, 2, 3, 400, 4]
    eager = _forward(ModelRunner(draft, role="draft", subset=subset), tokens)
    runner = StaticRunner(draft, compile=True, role="draft", subset=subset, progress=False)
    _forward(runner, tokens[:-1])  # the first forward lays the cache out (and builds the package)
    packaged = _forward(runner, tokens)
    assert runner._aot is not None and runner._aot.subset.key == subset.key
    torch.testing.assert_close(packaged, eager, rtol=1e-4, atol=1e-4)
    keys = [json.loads(path.read_text()) for path in packages.glob("*/key.json")]
    assert subset.key in [key.get("vocab") for key in keys]


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "package"])
def test_a_batch_drafts_on_the_subset_and_stays_exact(pair, packages, fast):
    target, draft = pair
    engine = Engine(target, draft, fast=fast, draft_vocab=SIZE, cache_dir=packages)
    rows = [prompt[0].tolist() for prompt in PROMPTS]
    out = generate(target, rows, draft=draft, method="ouroboros", max_new_tokens=30, eos_token_id=[],
                   engine=engine, pad_token_id=0)
    for row, prompt in enumerate(PROMPTS):
        width = prompt.shape[1]
        assert out.sequences[row, width:width + 30].tolist() == _reference(target, prompt, 30)[0].tolist()
    assert engine.batch_runner("draft", [0]).subset is engine.subsets["draft"]


PROMPTS = [torch.tensor([[3, 17, 250, 9, 41, 499, 12]]), torch.tensor([[7, 7, 8, 120, 7, 7, 8, 33]])]
