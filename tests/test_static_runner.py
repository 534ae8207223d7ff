"""The fast path (static KV cache, shape buckets, torch.compile) is exactly the target's greedy decoding.

The matrix runs the static runner uncompiled (quick); one test compiles a tiny model.
"""

import warnings

import pytest
import torch
from test_exactness import VOCAB, prompt, reference
from tiny_models import Runners, perturbed, tiny_model

import ouroboros.static_runner as static_runner
from ouroboros import METHODS, OuroborosConfig, generate
from ouroboros.engine import Engine
from ouroboros.methods import get_method
from ouroboros.runner import ModelRunner
from ouroboros.static_runner import StaticRunner, make_runner
from ouroboros.tree import DraftTree


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def models(request):
    target = tiny_model(request.param, seed=0, vocab=VOCAB)
    return {"target": target, "other": tiny_model(request.param, seed=7, vocab=VOCAB), "same": target,
            "perturbed": perturbed(target, scale=0.05)}


@pytest.fixture
def static():
    """generate() on uncompiled StaticRunners; a small first cache, so that long generations grow it."""
    return Runners(lambda model, role: StaticRunner(model, compile=False, min_capacity=16, role=role))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("draft_kind", ["other", "same", "perturbed"])
def test_methods_match_greedy_generate(models, static, method, draft_kind):
    target, draft = models["target"], models[draft_kind]
    for seed in range(3):
        ids = prompt(seed)
        ref = reference(target, ids, 40)
        engine, before = prepared(static, target, draft, method)
        out = generate(target, ids, draft=draft, method=method, max_new_tokens=40, eos_token_id=[], engine=engine)
        assert torch.equal(out.sequences, ref), (method, draft_kind, seed)
        assert out.stats.target_forwards == len(out.stats.accept_lengths)
        ran_on_static_runners(static[before:], out, target, draft if get_method(method).takes_draft else None)


def prepared(static, target, draft, method):
    """(an engine on the static runners, how many runners were made before the generation): a
    method that plans from costs has them measured first, on the engine's own runners."""
    engine, before = static.engine(target, draft), len(static)
    if get_method(method).needs_costs:
        assert engine.costs().meta["machine"]["runner"] == "eager" and len(static) == before + 2
    return engine, len(static)


def ran_on_static_runners(made, out, target, draft):
    """This generation's forwards all went through the static runners it built: one for the target,
    one for the draft where the method runs it (else a passing test says nothing of the fast path)."""
    assert [(runner.role, runner.model) for runner in made] == [("target", target)] + (
        [("draft", draft)] if draft is not None else [])
    assert made[0].forwards == out.stats.target_forwards > 0
    assert sum(len(runner.log) for runner in made) == len(out.stats.forward_log)


@pytest.mark.parametrize("method", METHODS)
def test_eos_and_budget_of_one(models, static, method):
    target, draft = models["target"], models["perturbed"]
    ids = prompt(3)
    free = reference(target, ids, 30)[0, ids.shape[1]:].tolist()
    eos = [free[9], free[4]]
    engine, before = prepared(static, target, draft, method)
    out = generate(target, ids, draft=draft, method=method, max_new_tokens=30, eos_token_id=eos, engine=engine)
    assert torch.equal(out.sequences, reference(target, ids, 30, eos=eos))
    ran_on_static_runners(static[before:], out, target, draft if get_method(method).takes_draft else None)
    assert out.finish_reason == "stop"
    one = generate(target, ids, draft=draft, method=method, max_new_tokens=1, eos_token_id=[],
                   engine=static.engine(target, draft))
    assert torch.equal(one.sequences, reference(target, ids, 1))


@pytest.mark.parametrize("length", [31, 32, 33, 70])
def test_prompts_across_buckets_and_a_growing_cache(models, static, length):
    """Prompts around the largest bucket (longer ones prefill eagerly), and 150 new tokens through
    caches of 16 -> 32 -> ... -> 256 slots: every growth copies the cache and stays exact."""
    target, draft = models["target"], models["perturbed"]
    ids = prompt(length, length=length)
    ref = reference(target, ids, 150)
    for method in ("vanilla", "ouroboros", "prompt_lookup"):
        out = generate(target, ids, draft=draft, method=method, max_new_tokens=150, eos_token_id=[],
                       engine=static.engine(target, draft))
        assert torch.equal(out.sequences, ref), (method, length)
    assert max(runner.capacity for runner in static) == 256


def test_sampling_on_the_fast_path_draws_what_the_eager_path_draws(models, static):
    """Same logits, same seed: the same samples (the eager path's sampling exactness carries over)."""
    target, draft = models["target"], models["perturbed"]
    config = OuroborosConfig(gamma=2, window=2, level=3)
    for seed in range(3):
        kwargs = dict(draft=draft, max_new_tokens=30, eos_token_id=[], do_sample=True, seed=seed, config=config)
        fast = generate(target, prompt(seed), engine=static.engine(target, draft), **kwargs)
        eager = generate(target, prompt(seed), engine=Engine(target, draft, fast=False), **kwargs)
        assert type(static[-1]) is StaticRunner
        assert torch.equal(fast.sequences, eager.sequences), seed


def test_logits_match_the_eager_runner_through_rewinds(models):
    """Forward, keep a non-prefix path, rewind into the kept tokens: logits agree with ModelRunner."""
    target = models["target"]
    eager, fast = ModelRunner(target), StaticRunner(target, min_capacity=8)
    tree = DraftTree()
    tree.add_chain([5, 6, 7])
    tree.add_chain([8, 9])
    steps = [(list(range(1, 12)), tree, [3, 4]), ([20], DraftTree(), []), ([21, 22], tree, [0])]
    tokens = []
    with torch.inference_mode():
        for pending, step_tree, path in steps:
            tokens += pending
            outs = [runner.forward(runner.rewind(tokens), step_tree) for runner in (eager, fast)]
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
            for runner in (eager, fast):
                runner.keep(path)
            tokens = list(eager.tokens)
            assert fast.tokens == tokens
        tokens = tokens[:-3] + [40]
        outs = [runner.forward(runner.rewind(tokens), tree) for runner in (eager, fast)]
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    assert fast.forwards == eager.forwards == 4


def test_make_runner_chooses_and_says_why(models, caplog):
    target = models["target"]
    assert type(make_runner(target, fast=False)) is ModelRunner
    with caplog.at_level("INFO", logger="ouroboros.static_runner"):
        assert type(make_runner(target)) is ModelRunner  # fp32 on CPU: not worth compiling
    assert "float32" in caplog.text
    runner = make_runner(target, fast=True)
    assert isinstance(runner, StaticRunner) and runner.compile
    blocked = tiny_model("llama", vocab=VOCAB)
    blocked._can_compile_fullgraph = False
    with pytest.warns(UserWarning, match="fast path off, using the eager runner: .*compilable"):
        assert type(make_runner(blocked, fast=True)) is ModelRunner


def test_a_failing_compile_runs_eagerly_and_stays_exact(models, monkeypatch):
    target = tiny_model("llama", seed=0, vocab=VOCAB)

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(static_runner, "_call_compiled", broken)
    monkeypatch.setattr(static_runner, "aot_blocker", lambda model: "in-process compiling is tested here")
    ids = prompt(1)
    with pytest.warns(UserWarning, match="torch.compile failed .*no compiler here"):
        out = generate(target, ids, method="lookahead", max_new_tokens=20, eos_token_id=[], fast=True)
    assert torch.equal(out.sequences, reference(target, ids, 20))
    assert "failed earlier" in static_runner.compile_blocker(target)


def test_compiled_tiny_model_is_exact(monkeypatch):
    """torch.compile with freezing in-process, for real (slow: a few graphs of a 2-layer model); on the
    CPU it serves models with no package (tests/test_aot.py tests the packages)."""
    monkeypatch.setattr(static_runner, "aot_blocker", lambda model: "in-process compiling is tested here")
    target = tiny_model("qwen2", seed=2, vocab=VOCAB)
    ids = prompt(2)
    ref = reference(target, ids, 24)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = generate(target, ids, method="prompt_lookup", max_new_tokens=24, eos_token_id=[], fast=True)
        again = generate(target, ids, method="lookahead", max_new_tokens=24, eos_token_id=[], fast=True)
    assert torch.equal(first.sequences, ref) and torch.equal(again.sequences, ref)
    assert not [w for w in caught if "eager" in str(w.message)]  # no fallback: it really ran compiled


@pytest.mark.parametrize("command", [["generate", "hi"], ["tune"], ["bench"]])
def test_eager_flag(command):
    from ouroboros.arguments import fast_from_args
    from ouroboros.cli import build_parser

    parser = build_parser()
    assert fast_from_args(parser.parse_args([*command, "--eager"])) is False
    assert fast_from_args(parser.parse_args(command)) is None
    assert fast_from_args(parser.parse_args([*command, "--fast"])) is True
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--fast", "--eager"])


def test_capacities_cover_the_prompt_to_the_whole_answer():
    capacities = static_runner.capacities
    assert capacities(100, 128) == {1024}
    assert capacities(900, 128) == {1024, 2048}  # 900 + 128 + 32 padding slots > 1024
    assert capacities(1000, 3000) == {1024, 2048, 4096}
    assert capacities(3000, 128) == {4096}
    assert capacities(20, 8, min_capacity=16) == {32, 64}
