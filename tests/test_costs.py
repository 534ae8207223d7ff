"""Cost tables, their replay, and the measured-cost cache (what auto and `bench --costs` stand on)."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from ouroboros import ConfigError, generate
from ouroboros.cost_cache import FORMAT, model_costs
from ouroboros.costs import CostTable, ModelCosts, vanilla_log
from ouroboros.engine import cost_table
from ouroboros.runner import ForwardRecord

REFERENCE = Path(__file__).resolve().parent / "data" / "cpu-2core-avx512bf16.json"
"""The reference AVX-512-bf16 cost table (the built-in pair, 2 threads; tests/data/README.md)."""


def table(target_ms=None, draft_ms=None):
    target = ModelCosts(target_ms or {64: {1: 100.0, 16: 130.0}, 512: {1: 120.0, 16: 150.0}}, {16: 100.0, 256: 900.0})
    draft = ModelCosts(draft_ms or {64: {1: 40.0, 16: 50.0}}, {16: 40.0, 256: 300.0})
    return CostTable(target, draft)


def test_interpolation_and_extrapolation():
    costs = table().target
    assert costs.forward(1, 64) == pytest.approx(0.100)
    assert costs.forward(16, 512) == pytest.approx(0.150)
    assert costs.forward(8, 64) == pytest.approx(0.100 + 0.030 * 7 / 15)
    assert costs.forward(1, 288) == pytest.approx(0.110)  # halfway between L=64 and L=512
    assert costs.forward(31, 64) == pytest.approx(0.160)  # past the last k: the last slope continues
    assert costs.prefill(136) == pytest.approx(0.100 + 0.800 * 120 / 240)


def test_extrapolation_never_falls_below_the_nearest_measurement():
    """A small model's 16-token forward measured 10x slower after 512 cached tokens than after 64:
    the line through them reaches zero before a 2-token context (found as a 400 from `serve` on a
    tiny model: "a cost curve needs positive seconds"). Below 64 the cost stays at 64's."""
    steep = ModelCosts({64: {1: 1.0, 16: 1.0}, 512: {1: 1.0, 16: 10.0}}, {16: 1.0, 256: 2.0})
    assert steep.forward(16, 2) == pytest.approx(0.001)
    assert steep.forward(16, 1024) == pytest.approx(0.001 + 0.009 * 960 / 448)  # rising: extended
    noisy = ModelCosts({64: {1: 2.0, 2: 1.0}}, {16: 3.0, 256: 1.0})
    assert noisy.forward(8, 64) == pytest.approx(0.001)  # a falling slope in k is not extended
    assert noisy.prefill(1024) == pytest.approx(0.001)


def test_replay_sums_each_forward_at_its_own_cost():
    t = table()
    log = [ForwardRecord("target", 16, 0, 9.9, 0.0), ForwardRecord("draft", 1, 64, 9.9, 1.0),
           ForwardRecord("target", 16, 512, 9.9, 2.0)]
    assert t.replay(log) == pytest.approx(0.100 + 0.040 + 0.150)
    plain = vanilla_log(16, 3)
    assert [(r.fed, r.cached) for r in plain] == [(16, 0), (1, 16), (1, 17)]


def test_the_reference_table_loads_and_replays_a_real_generation():
    reference = CostTable.load(REFERENCE)
    assert reference.target.forward(1, 512) == pytest.approx(0.1424)
    target = tiny_model("llama", seed=0, vocab=61)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6] * 2])
    out = generate(target, ids, method="prompt_lookup", max_new_tokens=40, eos_token_id=[])
    replayed = reference.replay(out.stats.forward_log)
    plain = reference.replay(vanilla_log(ids.shape[1], 40))
    assert 0 < replayed < plain  # fewer target forwards of nearly the same cost


@pytest.mark.parametrize("content", ["", "{not json", '{"format": "something-else"}', '{"target": {}}', "[1, 2]"])
def test_a_bad_cost_file_is_refused_naming_it(tmp_path, content):
    path = tmp_path / "costs.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="costs.json"):
        CostTable.load(path)
    with pytest.raises(ConfigError, match="missing.json"):
        CostTable.load(tmp_path / "missing.json")


def test_costs_are_measured_once_then_read_from_the_cache(tmp_path):
    model = tiny_model("llama", seed=3, vocab=61)
    first, spent = model_costs(model, cache_dir=tmp_path)
    assert spent > 0 and len(list(tmp_path.glob("*.json"))) == 1
    again, spent = model_costs(model, cache_dir=tmp_path)
    assert spent == 0 and again == first
    torch.set_num_threads(2)  # another thread count is another setting: measured anew
    try:
        _, spent = model_costs(model, cache_dir=tmp_path)
        assert spent > 0 and len(list(tmp_path.glob("*.json"))) == 2
    finally:
        torch.set_num_threads(1)


def test_another_cpu_or_a_capped_instruction_set_is_measured_anew(tmp_path, monkeypatch):
    """The same model on another chip (or this chip held to AVX2) has other costs: never reused."""
    model = tiny_model("llama", seed=7, vocab=61)
    model_costs(model, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.json")
    assert torch.backends.cpu.get_cpu_capability() in json.loads(path.read_text())["key"]["hardware"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    _, spent = model_costs(model, cache_dir=tmp_path)
    assert spent > 0 and len(list(tmp_path.glob("*.json"))) == 2


def test_the_cache_directory_is_created_on_first_use(tmp_path):
    model = tiny_model("llama", seed=6, vocab=61)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_costs(model, cache_dir=tmp_path / "not" / "yet")
    assert len(list((tmp_path / "not" / "yet").glob("*.json"))) == 1


def test_a_corrupt_or_foreign_cache_file_is_measured_again(tmp_path):
    model = tiny_model("llama", seed=4, vocab=61)
    model_costs(model, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.json")
    document = json.loads(path.read_text())
    assert document["format"] == FORMAT
    for broken in ("{truncated", json.dumps({**document, "key": {**document["key"], "model": "another"}})):
        path.write_text(broken)
        with pytest.warns(UserWarning, match=path.name):
            _, spent = model_costs(model, cache_dir=tmp_path)
        assert spent > 0
        assert json.loads(path.read_text())["key"] == document["key"]  # rewritten whole


def test_an_unwritable_cache_warns_once_and_still_works(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    model = tiny_model("llama", seed=5, vocab=61)
    with pytest.warns(UserWarning, match="cannot write the cost cache"):
        costs = cost_table(model, cache_dir=blocker / "costs")
    assert costs.target.forward(1, 64) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cost_table(model, cache_dir=blocker / "costs")  # the second time: no new warning
