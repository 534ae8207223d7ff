"""Models users bring: every method is exactly the model's own greedy `generate`, on tiny fp32 models
of the common families, on the eager runner and on the static-cache runner of the fast path.

The sliding-window ones (Gemma 2 and 3, Mistral, Phi-3, Qwen2 with use_sliding_window) get a window
smaller than the prompt, so that the window decides the output (`test_the_window_decides_the_output`).
"""

import warnings

import pytest
import torch
from test_exactness import prompt, reference
from tiny_models import FAMILIES, Runners, perturbed, tiny_family_model

import ouroboros.runner as runner_module
from ouroboros import METHODS, OuroborosConfig, UnsupportedModelError, generate
from ouroboros.runner import ModelRunner, check_tree_attention
from ouroboros.static_runner import StaticRunner, check_static_support, make_runner

VOCAB = 100
WINDOW = 5
NEW_TOKENS = 30
SLIDING = ("gemma2", "gemma3", "mistral", "phi3", "qwen2")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """(name, target, perturbed draft, {prompt seed: (prompt, greedy reference)})."""
    name = request.param
    target = tiny_family_model(name, vocab=VOCAB, window=WINDOW if name in SLIDING else None)
    references = {}
    for seed in range(2):
        ids = prompt(seed, vocab=VOCAB)
        references[seed] = ids, reference(target, ids, NEW_TOKENS)
    return name, target, perturbed(target, scale=0.05), references


@pytest.fixture(params=["eager", "static"])
def runners(request):
    """generate()'s runners: the eager one, or the fast path's StaticRunner uncompiled (compiling is
    test_static_runner's business; a small first cache, so that it grows during a generation)."""
    if request.param == "static":
        return request.param, Runners(lambda model, role: StaticRunner(model, compile=False, min_capacity=16,
                                                                        role=role))
    return request.param, Runners(lambda model, role: ModelRunner(model, role=role))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_greedy_generate(family, runners, method):
    name, target, draft, references = family
    for seed, (ids, ref) in references.items():
        out = generate(target, ids, draft=draft, method=method, max_new_tokens=NEW_TOKENS, eos_token_id=[],
                       engine=runners[1].engine(target, draft))
        assert torch.equal(out.sequences, ref), (name, runners[0], method, seed)
    kind = StaticRunner if runners[0] == "static" else ModelRunner
    assert runners[1] and all(type(runner) is kind for runner in runners[1])


@pytest.mark.parametrize("name", ["gemma2", "mistral"])
def test_long_drafts_cross_the_window(name, runners):
    """Drafts and accepted chains longer than a window of 3: a deep tree node must not see the
    pending tokens its window has left, while its ancestors in the tree stay visible."""
    target = tiny_family_model(name, seed=3, vocab=VOCAB, window=3)
    draft = perturbed(target, scale=0.02)
    config = OuroborosConfig(gamma=8, window=3, branches=2, level=4)
    for seed in range(2):
        ids = prompt(seed + 10, length=9, vocab=VOCAB)
        out = generate(target, ids, draft=draft, max_new_tokens=40, eos_token_id=[], config=config,
                       engine=runners[1].engine(target, draft))
        assert torch.equal(out.sequences, reference(target, ids, 40)), (name, seed)
        assert max(out.stats.accept_lengths) > 3


@pytest.mark.parametrize("name", SLIDING)
def test_the_window_decides_the_output(name, monkeypatch):
    """Without the window's band in the mask, the sliding families' outputs would differ from greedy:
    the windows above are small enough to matter, and the mask is what applies them."""
    target = tiny_family_model(name, vocab=VOCAB, window=WINDOW)
    windows = runner_module.attention_windows(target)
    assert WINDOW in windows.values()
    ids = prompt(0, vocab=VOCAB)
    ref = reference(target, ids, NEW_TOKENS)
    monkeypatch.setattr(runner_module, "attention_windows", lambda model: dict.fromkeys(windows))
    out = generate(target, ids, method="vanilla", max_new_tokens=NEW_TOKENS, eos_token_id=[], fast=False)
    assert not torch.equal(out.sequences, ref)


def test_every_family_gets_the_fast_path(family):
    """make_runner(fast=True) builds a StaticRunner (it compiles on its first forward), no fallback;
    its cache keeps sliding layers' keys in full layers, as the eager runner's does."""
    _, target, _, _ = family
    check_tree_attention(target)
    check_static_support(target)
    runner = make_runner(target, fast=True)
    assert isinstance(runner, StaticRunner) and runner.compile


@pytest.mark.parametrize("layer_types, message", [
    (["chunked_attention", "full_attention"], "chunked_attention layers; tree verification supports only"),
    (["linear_attention", "full_attention"], "linear_attention layers"),
])
def test_attention_it_cannot_mask_is_refused_by_name(layer_types, message):
    model = tiny_family_model("qwen3", vocab=VOCAB)
    model.config.layer_types = layer_types
    with pytest.raises(UnsupportedModelError, match=f"Qwen3ForCausalLM has {message}"):
        generate(model, prompt(0, vocab=VOCAB), method="vanilla", max_new_tokens=2)
    with pytest.raises(UnsupportedModelError, match="Qwen3ForCausalLM"):
        check_static_support(model)


def test_compiled_hybrid_model_is_exact():
    """torch.compile for real on a model that takes one mask per layer type (slow: one graph)."""
    target = tiny_family_model("gemma3", seed=2, vocab=VOCAB, window=WINDOW)
    ids = prompt(2, vocab=VOCAB)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(target, ids, method="lookahead", max_new_tokens=24, eos_token_id=[], fast=True)
    assert torch.equal(out.sequences, reference(target, ids, 24))
    assert not [w for w in caught if "eager" in str(w.message)]  # no fallback: it really ran compiled


def test_the_tree_attention_probe_is_remembered_per_class_and_config(tmp_path, monkeypatch):
    """The probe runs three whole forwards (every weight read): once a class and config passed on this
    machine, a new model object of them is not run again; another config is probed."""
    monkeypatch.setenv("OUROBOROS_COST_CACHE", str(tmp_path))
    calls = []

    def counted(model):
        model.register_forward_pre_hook(lambda *args: calls.append(type(model).__name__))
        return model

    check_tree_attention(counted(tiny_family_model("qwen3", vocab=VOCAB)))
    assert len(calls) == 3 and (tmp_path / runner_module.VERDICTS).is_file()
    calls.clear()
    check_tree_attention(counted(tiny_family_model("qwen3", vocab=VOCAB)))
    assert calls == []
    check_tree_attention(counted(tiny_family_model("qwen3", vocab=VOCAB + 1)))
    assert len(calls) == 3
