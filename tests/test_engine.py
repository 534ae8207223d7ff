"""The engine: runners of the kind decided once, cost tables owned and measured on those runners,
engines cached per (target, draft, fast) without keeping models alive, and proposers built without I/O."""

import dataclasses
import gc
import weakref

import pytest
import torch
from test_exactness import VOCAB, prompt, reference
from tiny_models import Runners, perturbed, tiny_model

from ouroboros import METHODS, OuroborosConfig, generate
from ouroboros.costs import CostTable, vanilla_log
from ouroboros.engine import Engine, engine_for
from ouroboros.errors import InvalidArgumentError
from ouroboros.methods import Setup, get_method
from ouroboros.pool import PhrasePool
from ouroboros.proposers import Planned
from ouroboros.runner import ModelRunner

REFERENCE_TABLE = "tests/data/cpu-2core-avx512bf16.json"


@pytest.fixture
def pair():
    target = tiny_model("llama", seed=21, vocab=VOCAB)
    return target, perturbed(target)


def test_generate_reuses_one_engine_per_pair_and_choice(pair):
    target, draft = pair
    assert engine_for(target, draft) is engine_for(target, draft)
    assert engine_for(target, draft) is not engine_for(target)
    assert engine_for(target, draft, fast=False) is not engine_for(target, draft)
    assert engine_for(target, draft).compiled == {"target": False, "draft": False}  # fp32 on CPU: eager


def test_a_cached_engine_keeps_no_model_alive():
    target, draft = tiny_model("llama", seed=22, vocab=VOCAB), tiny_model("llama", seed=23, vocab=VOCAB)
    engine = engine_for(target, draft)
    generate(target, prompt(0), draft=draft, max_new_tokens=4, eos_token_id=[])
    models = [weakref.ref(target), weakref.ref(draft)]
    del target, draft
    gc.collect()
    assert [ref() for ref in models] == [None, None]
    assert engine.target is None and engine.draft is None


def test_an_engine_built_by_hand_holds_its_models():
    engine = Engine(tiny_model("llama", seed=24, vocab=VOCAB))
    gc.collect()
    assert engine.target is not None


def test_costs_are_measured_once_per_engine_on_its_own_runners(pair, tmp_path):
    target, draft = pair
    runners = Runners(lambda model, role: ModelRunner(model, role=role))
    engine = Engine(target, draft, fast=False, cache_dir=tmp_path, make_runner=runners.make)
    first = engine.costs()
    assert [runner.role for runner in runners] == ["target", "draft"]
    assert all(runner.forwards > 0 for runner in runners)  # the table was timed on these runners
    assert first.meta["measure_seconds"] > 0 and len(list(tmp_path.glob("*.json"))) == 2
    assert engine.costs() is first and len(runners) == 2  # kept: nothing measured or read again
    again = Engine(target, draft, fast=False, cache_dir=tmp_path).costs()
    assert again.meta["measure_seconds"] == 0 and again.target == first.target  # another engine reads the files


def test_a_table_a_run_shows_wrong_is_dropped_and_measured_again(pair, tmp_path):
    target, draft = pair
    engine = Engine(target, draft, fast=False, cache_dir=tmp_path)
    table = engine.costs()
    off = [record for record in _timed_vanilla(table) if record.model == "target"]
    with pytest.warns(UserWarning, match="the target took"):
        assert engine.check_costs(table, [_scaled(record, 5.0) for record in off], min_seconds=0)
    fresh = engine.costs()
    assert fresh is not table and fresh.meta["measure_seconds"] > 0


def test_a_given_engine_runs_the_generation_and_must_match_its_models(pair):
    target, draft = pair
    runners = Runners(lambda model, role: ModelRunner(model, role=role))
    ids = prompt(1)
    out = generate(target, ids, draft=draft, max_new_tokens=20, eos_token_id=[],
                   engine=Engine(target, draft, make_runner=runners.make))
    assert torch.equal(out.sequences, reference(target, ids, 20))
    assert [runner.role for runner in runners] == ["target", "draft"]
    assert runners[0].forwards == out.stats.target_forwards
    with pytest.raises(InvalidArgumentError, match="engine was built for other models"):
        generate(target, ids, max_new_tokens=2, engine=Engine(target, draft))


def test_batches_take_their_runners_and_batched_costs_from_the_engine(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("OUROBOROS_COST_CACHE", str(tmp_path))
    target, draft = pair
    engine = Engine(target, draft, fast=False)
    rows = [prompt(2).tolist()[0], prompt(3).tolist()[0][:5]]
    out = generate(target, rows, draft=draft, max_new_tokens=12, eos_token_id=[], pad_token_id=0, engine=engine)
    assert set(engine._batch_costs) == {"target", "draft"}  # measured once, kept by the engine
    kept = engine.batch_costs("target")
    generate(target, rows, draft=draft, max_new_tokens=4, eos_token_id=[], pad_token_id=0, engine=engine)
    assert engine.batch_costs("target") is kept
    for i, row in enumerate(rows):
        assert out.sequences[i, :len(row) + 12].tolist() == reference(target, torch.tensor([row]), 12)[0].tolist()


@pytest.mark.parametrize("method", METHODS)
def test_building_a_proposer_does_no_io(pair, tmp_path, monkeypatch, method):
    """A method's builder gets resolved runners and costs: building one measures, reads and writes
    nothing (the cost cache stays empty, and no model runs)."""
    monkeypatch.setenv("OUROBOROS_COST_CACHE", str(tmp_path))
    target, draft = pair
    spec = get_method(method)
    draft_runner = ModelRunner(draft, role="draft") if spec.takes_draft else None
    costs = CostTable.load(REFERENCE_TABLE) if spec.needs_costs else None
    ids = prompt(4)[0].tolist()
    config = OuroborosConfig()
    proposer = spec.build(Setup(ids, config, PhrasePool(config.level, config.pool_size), draft_runner, 16, costs))
    assert list(tmp_path.iterdir()) == []
    assert draft_runner is None or draft_runner.forwards == 0
    assert isinstance(proposer, Planned) == (method == "auto")


def _timed_vanilla(table: CostTable):
    return [_scaled(record, 1.0, table) for record in vanilla_log(64, 400)]


def _scaled(record, factor: float, table: CostTable | None = None):
    seconds = factor * (table.costs(record.model).seconds(record) if table is not None else record.seconds)
    return dataclasses.replace(record, seconds=seconds)
