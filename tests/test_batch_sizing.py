"""Speculation sized by load: the node budget a batch's step may verify follows the batched forward's
measured cost and the rows' observed acceptance, down to plain batched decoding."""

import pytest
from tiny_models import tiny_model

import ouroboros.batch_costs as batch_costs_module
from ouroboros.batch_costs import BatchCosts, batch_costs
from ouroboros.batch_sizing import LoadSizer, RowAcceptance

TARGET = BatchCosts({1: {1: 81.8, 2: 76.4, 4: 76.4, 8: 89.8, 16: 110.8},
                     2: {1: 82.8, 2: 80.5, 4: 92.6, 8: 108.2, 16: 167.6},
                     4: {1: 101.1, 2: 101.7, 4: 124.5, 8: 186.4, 16: 297.8},
                     8: {1: 157.0, 2: 153.3, 4: 218.0, 8: 326.4, 16: 557.6}})
DRAFT = BatchCosts({1: {1: 27.6, 2: 26.9, 4: 26.9, 8: 30.9, 16: 36.9},
                    2: {1: 28.1, 2: 27.8, 4: 32.5, 8: 39.1, 16: 63.0},
                    4: {1: 36.3, 2: 40.3, 4: 41.4, 8: 66.8, 16: 102.5},
                    8: {1: 47.6, 2: 51.9, 4: 69.3, 8: 113.7, 16: 197.5}})
"""The built-in pair's compiled packages on a 2-core AVX-512-bf16 CPU: ms per forward of rows x new
tokens after ~300 cached tokens per row (one new token is padded to two on the package)."""


def flat(ms: float) -> BatchCosts:
    return BatchCosts({rows: {1: ms, 16: ms} for rows in (1, 8)})


def sizer(target: BatchCosts, rate: float | None = None, draft: BatchCosts | None = None,
          free_rate: float | None = None) -> LoadSizer:
    """A sizer whose rows (0-15) draft with acceptance `rate` (the draft model's) and `free_rate`
    (free drafts), always having a proposal."""
    s = LoadSizer(target, draft, ceiling=15)
    for mode, value in ((True, rate), (False, free_rate)):
        if value is not None:
            for row in range(16):
                s.rows[row, mode] = RowAcceptance(accepted=1000 * value, tried=1000, proposed=1, steps=1)
    return s


def budgets(s: LoadSizer) -> list[int]:
    return [s.plan(list(range(rows)))[0] for rows in (1, 2, 4, 8, 16)]


def test_acceptance_counts_each_position_until_the_first_rejection():
    row = RowAcceptance(accepted=0, tried=0, proposed=0, steps=0)
    row.observe(depth=3, accepted=3)  # all three accepted: three tries, no rejection seen
    row.observe(depth=4, accepted=1)  # one accepted, the second rejected
    row.observe(depth=0, accepted=0)  # nothing to propose: a step without a proposal
    row.observe(depth=2, accepted=0)
    assert (row.accepted, row.tried, row.proposed, row.steps) == (4, 6, 3, 4)
    assert row.expected(2) == pytest.approx(0.75 * (4 / 6 + (4 / 6) ** 2))


def test_speculation_shrinks_as_the_batch_grows_down_to_plain_decoding():
    sizes = budgets(sizer(TARGET, free_rate=0.5))
    assert sizes == sorted(sizes, reverse=True), sizes
    assert sizes[0] >= 4 and sizes[-1] <= 1 and sizes[-1] < sizes[0], sizes


def test_a_padded_token_is_drafted_for_free():
    """One new token costs the package what two do: the second is worth drafting, however unlikely."""
    assert sizer(TARGET, free_rate=0.05).plan(list(range(8))) == (1, False)


def test_free_tokens_and_good_drafts_get_the_whole_budget():
    assert sizer(flat(100.0), free_rate=0.9).plan(list(range(8))) == (12, False)  # the largest choice within 15


def test_tokens_that_cost_their_full_price_never_pay():
    linear = sizer(BatchCosts({rows: {1: 10.0 * rows, 2: 20.0 * rows, 16: 160.0 * rows} for rows in (1, 8)}),
                   free_rate=0.95)
    assert linear.plan([0, 1]) == (0, False)


def test_poor_acceptance_turns_speculation_off():
    steeper = BatchCosts({rows: {width: ms * (1.2 if width > 1 else 1.0) for width, ms in table.items()}
                          for rows, table in TARGET.forward_ms.items()})  # a second token costs 20% more
    for costs in (TARGET, steeper):
        s = sizer(costs, draft=DRAFT)
        assert s.plan([0, 1])[0] > 0  # the priors expect drafts to pay
        for row in (0, 1):
            for mode in (True, False):
                for _ in range(50):
                    s.row(row, mode).observe(depth=4, accepted=0)
        assert s.plan([0, 1]) == ((1, False) if costs is TARGET else (0, False))  # only a padded token is free


def test_the_draft_model_drafts_where_its_acceptance_pays_for_its_forwards():
    """A good draft model beats weak free drafts at a few rows; priced at four times its table's
    forward per drafted node, it no longer does."""
    s = sizer(TARGET, rate=0.8, draft=DRAFT, free_rate=0.2)
    k, drafts = s.plan([0, 1, 2, 3])
    assert k > 0 and drafts
    for _ in range(20):
        s.observe_draft(seconds=4 * 2 * DRAFT.forward(4, 2), rows=4, nodes=2)
    assert s.plan([0, 1, 2, 3])[1] is False


def test_batched_costs_are_measured_once_per_model_and_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("OUROBOROS_COST_CACHE", str(tmp_path))
    model = tiny_model("llama", seed=41, vocab=61)
    measured = []
    real = batch_costs_module._measure
    monkeypatch.setattr(batch_costs_module, "_measure", lambda *args: measured.append(1) or real(*args))
    costs = batch_costs(model, fast=False)
    assert set(costs.forward_ms) == set(batch_costs_module.ROWS)
    assert all(set(row) == set(batch_costs_module.WIDTHS) for row in costs.forward_ms.values())
    assert costs.forward(8, 16) > 0 and costs.forward(16, 16) >= costs.forward(8, 16)
    assert batch_costs(model, fast=False) == costs and measured == [1]  # read back from its file
    assert len(list(tmp_path.glob("*.json"))) == 1
