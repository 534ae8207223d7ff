"""Batched generate: every row is exactly `generate` on that row alone, and HF greedy `generate`
(fp32 tiny random models); the batch runner's logits are the solo runner's; the rows' draft
forwards are batched, and a row failing inside propose() fails the batch without hanging."""

import os
import threading
from dataclasses import replace

import pytest
import torch
from tiny_models import perturbed, tiny_family_model, tiny_model

import ouroboros.aot as aot
from ouroboros import METHODS, PhrasePool, batch_runner, batch_session, generate
from ouroboros.acceptance import greedy_verify
from ouroboros.batch_generation import BatchGenerationOutput, generate_batch
from ouroboros.batch_runner import CAPACITY_STEP, make_batch_runner
from ouroboros.batch_session import BatchSession
from ouroboros.errors import InvalidArgumentError
from ouroboros.methods import Method, get_method, register, unregister
from ouroboros.request import make_verifier
from ouroboros.runner import ModelRunner
from ouroboros.tree import DraftTree

VOCAB = 61
PAD = 0
LENGTHS = (3, 20, 8, 14)
BATCHED = [method for method in METHODS if method != "auto"]
DRAFTING = ["speculative", "ouroboros"]


@pytest.fixture(scope="module")
def models():
    target = tiny_model("llama", seed=0, vocab=VOCAB)
    return {"target": target, "other": tiny_model("llama", seed=7, vocab=VOCAB), "same": target,
            "perturbed": perturbed(target, scale=0.05)}


def prompt(seed, length):
    """Prompts with repetition, so that prompt lookup and context phrases find matches."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, VOCAB, ((length + 1) // 2,), generator=g).tolist()
    return (base + base)[:length]


PROMPTS = [prompt(seed, length) for seed, length in enumerate(LENGTHS)]


def hf_greedy(target, row, max_new_tokens, eos=()):
    """HF greedy generate on one row alone: its new tokens (stopping after an EOS)."""
    ids = torch.tensor([row])
    out = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                          eos_token_id=list(eos) or None, pad_token_id=PAD, repetition_penalty=1.0)
    return out[0, len(row):].tolist()


@pytest.fixture(scope="module")
def eos_case(models):
    """EOS ids that end row 3 on its first token, row 2 a few steps in, and leave row 1 to its budget."""
    free = [hf_greedy(models["target"], row, 24) for row in PROMPTS]
    late = next(token for k, token in enumerate(free[2]) if k >= 3 and token not in free[2][:k] + free[1] + free[3][:1])
    eos = [free[3][0], late]
    expected = [hf_greedy(models["target"], row, 24, eos) for row in PROMPTS]
    assert len(expected[3]) == 1 and len(expected[1]) == 24 and 1 < len(expected[2]) < 24
    return eos, expected


def new_tokens(out: BatchGenerationOutput, row: int, prompt_width: int) -> list[int]:
    """Row `row`'s new tokens, checking that only padding follows them."""
    n = out.stats[row].new_tokens
    tokens = out.sequences[row, prompt_width:].tolist()
    assert tokens[n:] == [PAD] * (len(tokens) - n)
    return tokens[:n]


@pytest.mark.parametrize("method", BATCHED)
@pytest.mark.parametrize("draft_kind", ["other", "same", "perturbed"])
def test_rows_match_solo_generate_and_hf_greedy(models, eos_case, method, draft_kind):
    target, draft = models["target"], models[draft_kind]
    eos, expected = eos_case
    out = generate(target, PROMPTS, draft=draft, method=method, max_new_tokens=24, eos_token_id=eos,
                   pad_token_id=PAD)
    assert isinstance(out, BatchGenerationOutput)
    assert out.sequences.shape == (4, max(len(p) + len(e) for p, e in zip(PROMPTS, expected)))
    assert out.finish_reasons[1:] == ["length", "stop", "stop"]
    unsized = generate_batch(target, PROMPTS, draft=draft, method=method, max_new_tokens=24, eos_token_id=eos,
                             pad_token_id=PAD, size_by_load=False)
    for i, row in enumerate(PROMPTS):
        solo = generate(target, torch.tensor([row]), draft=draft, method=method, max_new_tokens=24, eos_token_id=eos)
        assert out.sequences[i, :len(row)].tolist() == row
        assert new_tokens(out, i, len(row)) == expected[i] == solo.sequences[0, len(row):].tolist(), (method, i)
        assert out.finish_reasons[i] == solo.finish_reason
        assert unsized.sequences[i].tolist() == out.sequences[i].tolist()
        out = unsized  # without load sizing, the same proposals as alone, step by step
        assert out.stats[i].accept_lengths == solo.stats.accept_lengths
        assert out.stats[i].target_forwards == solo.stats.target_forwards == len(solo.stats.accept_lengths)
        assert out.stats[i].draft_forwards == solo.stats.draft_forwards


def test_budget_of_one_and_rows_ending_on_their_first_token(models, eos_case):
    target, draft = models["target"], models["perturbed"]
    eos, expected = eos_case
    for method in BATCHED:
        out = generate(target, PROMPTS, draft=draft, method=method, max_new_tokens=1, eos_token_id=[],
                       pad_token_id=PAD)
        assert [new_tokens(out, i, len(row)) for i, row in enumerate(PROMPTS)] == [e[:1] for e in expected]
        assert [s.target_forwards for s in out.stats] == [1] * 4 and out.finish_reasons == ["length"] * 4
        ends = generate(target, PROMPTS, draft=draft, method=method, max_new_tokens=24, eos_token_id=[expected[0][0]],
                        pad_token_id=PAD)
        assert ends.finish_reasons[0] == "stop" and ends.stats[0].target_forwards == 1
        for i, row in enumerate(PROMPTS):
            assert new_tokens(ends, i, len(row)) == hf_greedy(target, row, 24, [expected[0][0]]), (method, i)


@pytest.mark.parametrize("method", DRAFTING)
@pytest.mark.parametrize("draft_kind", ["other", "same", "perturbed"])
def test_batched_draft_rows_with_budgets_of_one_and_two(models, method, draft_kind):
    """Budgets too short to draft (1) or to draft more than one token (2): every row still its solo run."""
    target, draft = models["target"], models[draft_kind]
    expected = [hf_greedy(target, row, 2) for row in PROMPTS]
    for budget in (1, 2):
        out = generate_batch(target, PROMPTS, draft=draft, method=method, max_new_tokens=budget, eos_token_id=[],
                             pad_token_id=PAD, size_by_load=False)
        for i, row in enumerate(PROMPTS):
            solo = generate(target, torch.tensor([row]), draft=draft, method=method, max_new_tokens=budget,
                            eos_token_id=[])
            assert new_tokens(out, i, len(row)) == expected[i][:budget] == solo.sequences[0, len(row):].tolist()
            assert out.stats[i].accept_lengths == solo.stats.accept_lengths
            assert out.stats[i].draft_forwards == solo.stats.draft_forwards


def draft_rounds(log) -> list[int]:
    """A solo run's draft forwards before each of its target forwards (its forward log, in order)."""
    rounds = [0]
    for record in log:
        if record.model == "target":
            rounds.append(0)
        else:
            rounds[-1] += 1
    return rounds[:-1]


@pytest.mark.parametrize("method", DRAFTING)
def test_draft_forwards_are_batched_across_rows(models, eos_case, method):
    """The draft model runs once per drafting round of the step, for all rows: the calls are the sum
    over steps of the most draft forwards any row needed in that step, not the rows' sum."""
    target, draft = models["target"], models["other"]
    eos, _ = eos_case
    solos = [generate(target, torch.tensor([row]), draft=draft, method=method, max_new_tokens=24, eos_token_id=eos)
             for row in PROMPTS]
    rounds = [draft_rounds(solo.stats.forward_log) for solo in solos]
    steps = max(len(r) for r in rounds)
    expected = sum(max(r[s] for r in rounds if s < len(r)) for s in range(steps))
    calls = []
    hook = draft.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        out = generate_batch(target, PROMPTS, draft=draft, method=method, max_new_tokens=24, eos_token_id=eos,
                             pad_token_id=PAD, size_by_load=False)
    finally:
        hook.remove()
    totals = [solo.stats.draft_forwards for solo in solos]
    assert len(calls) == expected
    assert max(totals) <= len(calls) < sum(totals), (totals, len(calls))
    assert [s.draft_forwards for s in out.stats] == totals
    for stats in out.stats:
        assert [record.model for record in stats.forward_log].count("draft") == stats.draft_forwards


class Boom(Exception):
    pass


class FailingRunner:
    """A row's draft runner that raises on its `fail_at`-th forward (inside that row's propose()), or
    with `at_keep` on the keep after it (the forward ran, its slots are taken)."""

    def __init__(self, runner, fail_at, at_keep=False):
        self.runner, self.fail_at, self.at_keep, self.calls = runner, fail_at, at_keep, 0

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def forward(self, pending, tree):
        self.calls += 1
        if self.calls == self.fail_at and not self.at_keep:
            raise Boom(f"row failed on draft forward {self.calls}")
        return self.runner.forward(pending, tree)

    def keep(self, path):
        if self.calls == self.fail_at and self.at_keep:
            raise Boom(f"row failed after draft forward {self.calls}")
        self.runner.keep(path)


@pytest.mark.parametrize("row, fail_at", [(0, 1), (2, 3), (3, 2)])
def test_a_row_failing_inside_propose_raises_without_hanging(models, row, fail_at):
    ouroboros = get_method("ouroboros")

    def build(setup):
        if setup.prompt == PROMPTS[row]:
            setup = replace(setup, draft_runner=FailingRunner(setup.draft_runner, fail_at))
        return ouroboros.build(setup)

    register(Method("failing_row", build, needs_draft=True))
    outcome = []

    def run():
        try:
            generate_batch(models["target"], PROMPTS, draft=models["other"], method="failing_row", max_new_tokens=24,
                           eos_token_id=[], pad_token_id=PAD, size_by_load=False)
        except BaseException as exc:
            outcome.append(exc)

    try:
        caller = threading.Thread(target=run, daemon=True)
        caller.start()
        caller.join(timeout=120)
    finally:
        unregister("failing_row")
    assert not caller.is_alive(), "generate_batch hung after a row failed"
    assert len(outcome) == 1 and isinstance(outcome[0], Boom), outcome
    assert not [t for t in threading.enumerate() if t.name.startswith("draft-row")]


@pytest.mark.parametrize("kind", ["eager", "packaged"])
def test_a_long_joining_prompt_is_fed_in_chunks_between_the_others_steps(models, request, kind, monkeypatch):
    """While rows decode, a joining prompt is fed PREFILL_CHUNK tokens a step (target and draft), and
    the others emit a token every step meanwhile; every row is exactly its solo output."""
    if kind == "packaged":
        request.getfixturevalue("packaged")
    monkeypatch.setattr(batch_session, "PREFILL_CHUNK", 8)
    target, draft = models["target"], models["perturbed"]
    long = prompt(11, 40)
    with BatchSession(target, draft, method="ouroboros", fast=kind == "packaged", size_by_load=False) as session:
        first = [session.add(PROMPTS[i], max_new_tokens=60) for i in (0, 2)]  # 3 and 8 tokens: not chunked
        session.step()
        joined = session.add(long, max_new_tokens=16)
        fed, drafted = [], []
        while not session.rows[joined].new_tokens:
            before = [len(session.rows[row].new_tokens) for row in first]
            session.step()
            fed.append(len(session.runner.tokens[joined]))
            drafted.append(len(session.drafts.runner.tokens[joined]))
            assert all(len(session.rows[row].new_tokens) > n for row, n in zip(first, before))
        assert fed[:4] == drafted[:4] == [8, 16, 24, 32] and len(fed) == 5  # 39 before its root: 4 chunks
        while session.active:
            session.step()
    for row, tokens, n in ((first[0], PROMPTS[0], 60), (first[1], PROMPTS[2], 60), (joined, long, 16)):
        assert session.rows[row].new_tokens == hf_greedy(target, tokens, n), row


@pytest.mark.parametrize("at_keep", [False, True])
@pytest.mark.parametrize("kind", ["eager", "packaged"])
def test_a_failing_row_ends_alone_and_the_others_stay_exact(models, request, kind, at_keep):
    """Row 1's proposer raises inside propose() (on a draft forward, or on the keep after it, while
    the others draft in the same rounds) and row 2's logits turn NaN at its third step (its sampler
    refuses them): each of the two ends with its own error, every forward's slots are still
    compacted, and rows 0 and 3 are exactly their solo outputs."""
    if kind == "packaged":
        request.getfixturevalue("packaged")
    target, draft = models["target"], models["perturbed"]
    ouroboros = get_method("ouroboros")

    def build(setup):
        if setup.prompt == PROMPTS[1]:
            setup = replace(setup, draft_runner=FailingRunner(setup.draft_runner, 3, at_keep))
        return ouroboros.build(setup)

    sample = make_verifier(True, 1.0, 0, 1.0, 0.0, 0, None)
    steps = []

    def nan_at_third_step(tree, logits):
        steps.append(1)
        return sample(tree, torch.full_like(logits, float("nan")) if len(steps) == 3 else logits)

    register(Method("failing_row", build, needs_draft=True))
    try:
        with BatchSession(target, draft, method="failing_row", fast=kind == "packaged", size_by_load=False) as session:
            rows = [session.add(tokens, max_new_tokens=16, verify=nan_at_third_step if i == 2 else greedy_verify)
                    for i, tokens in enumerate(PROMPTS)]
            ended = {}
            while session.active:
                ended.update(dict.fromkeys(session.step(), len(steps)))
                assert session.runner.settled and session.drafts.runner.settled  # no slot left uncompacted
    finally:
        unregister("failing_row")
    assert isinstance(session.rows[rows[1]].error, Boom) and session.rows[rows[1]].finish == "error"
    assert isinstance(session.rows[rows[2]].error, FloatingPointError) and ended[rows[2]] == 3
    for i in (0, 3):
        assert session.rows[rows[i]].error is None and session.rows[rows[i]].finish == "length"
        assert session.rows[rows[i]].new_tokens == hf_greedy(target, PROMPTS[i], 16), i
    assert session.runner.rows == [] and session.drafts.runner.rows == []


def test_left_padded_input_ids_give_the_same_rows(models):
    target, draft = models["target"], models["perturbed"]
    width = max(LENGTHS)
    ids = torch.full((4, width), 7)  # padding ids that are not the pad id: the mask is what counts
    mask = torch.zeros(4, width, dtype=torch.long)
    for i, row in enumerate(PROMPTS):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    padded = generate(target, ids, attention_mask=mask, draft=draft, max_new_tokens=20, eos_token_id=[],
                      pad_token_id=PAD)
    listed = generate(target, PROMPTS, draft=draft, max_new_tokens=20, eos_token_id=[], pad_token_id=PAD)
    assert torch.equal(padded.sequences[:, :width], ids)
    for i, row in enumerate(PROMPTS):
        assert new_tokens(padded, i, width) == new_tokens(listed, i, len(row)) == hf_greedy(target, row, 20)


def test_shared_warm_pool_changes_no_row(models):
    target, draft = models["target"], models["perturbed"]
    pool = PhrasePool(level=4, capacity=8)
    for _ in range(2):  # cold, then warm
        out = generate(target, PROMPTS, draft=draft, max_new_tokens=20, eos_token_id=[], pool=pool, pad_token_id=PAD)
        for i, row in enumerate(PROMPTS):
            assert new_tokens(out, i, len(row)) == hf_greedy(target, row, 20)
    assert len(pool) > 0


@pytest.mark.parametrize("method", ["vanilla", "ouroboros"])
def test_sampling_row_equals_solo_with_its_seed(models, method):
    target, draft = models["target"], models["perturbed"]
    options = dict(do_sample=True, temperature=0.9, top_k=30, top_p=0.95, eos_token_id=[], max_new_tokens=16)
    out = generate(target, PROMPTS, draft=draft, method=method, seed=11, pad_token_id=PAD, **options)
    rows = [new_tokens(out, i, len(row)) for i, row in enumerate(PROMPTS)]
    for i, row in enumerate(PROMPTS):
        solo = generate(target, torch.tensor([row]), draft=draft, method=method, seed=11 + i, **options)
        assert rows[i] == solo.sequences[0, len(row):].tolist()
    assert len({tuple(r) for r in rows}) > 1
    again = generate(target, PROMPTS, draft=draft, method=method, seed=11, pad_token_id=PAD, **options)
    assert torch.equal(again.sequences, out.sequences)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_window_rows_match_solo(family):
    """Windows shorter than the rows: each row's window is cut from its own positions."""
    target = tiny_family_model(family, seed=0, vocab=VOCAB, window=4)
    draft = perturbed(target, scale=0.05)
    out = generate(target, PROMPTS, draft=draft, max_new_tokens=12, eos_token_id=[], pad_token_id=PAD)
    for i, row in enumerate(PROMPTS):
        solo = generate(target, torch.tensor([row]), draft=draft, max_new_tokens=12, eos_token_id=[])
        assert new_tokens(out, i, len(row)) == solo.sequences[0, len(row):].tolist() == hf_greedy(target, row, 12)


def test_a_batch_of_one_row_runs_the_single_stream_loop(models):
    """One row (a list of one prompt, or left-padded input_ids [1, L]) is a solo call in the batched
    output's shape, so it is as fast as one and takes every method, auto included."""
    target, draft = models["target"], models["perturbed"]
    ids = torch.tensor([[PAD, PAD] + PROMPTS[1]])
    for prompts, mask in (([PROMPTS[1]], None), (ids, torch.tensor([[0, 0] + [1] * len(PROMPTS[1])]))):
        out = generate(target, prompts, attention_mask=mask, draft=draft, method="auto", max_new_tokens=12,
                       eos_token_id=[], pad_token_id=PAD)
        assert isinstance(out, BatchGenerationOutput) and out.stats[0].plan  # auto planned: the solo loop ran
        width = out.sequences.shape[1] - 12
        assert out.sequences[0, :width].tolist() == (PROMPTS[1] if mask is None else ids[0].tolist())
        assert new_tokens(out, 0, width) == hf_greedy(target, PROMPTS[1], 12)


@pytest.mark.parametrize("draft_kind", ["perturbed", None])
def test_auto_in_a_batch_is_the_load_sizing_and_exact(models, eos_case, draft_kind):
    """auto batches: the load sizing over ouroboros's proposals (prompt lookup's without a draft)."""
    target, draft = models["target"], models.get(draft_kind)
    eos, expected = eos_case
    out = generate(target, PROMPTS, draft=draft, method="auto", max_new_tokens=24, eos_token_id=eos, pad_token_id=PAD)
    assert [new_tokens(out, i, len(row)) for i, row in enumerate(PROMPTS)] == expected
    if draft is None:
        assert all(stats.draft_forwards == 0 for stats in out.stats)


@pytest.fixture(scope="module")
def packaged(models, tmp_path_factory):
    """The tiny target's and perturbed draft's compiled packages, built once into a fresh folder."""
    folder = tmp_path_factory.mktemp("compiled")
    old = os.environ.get(aot.CACHE_ENV)
    os.environ[aot.CACHE_ENV] = str(folder)
    for model in (models["target"], models["perturbed"]):
        assert aot.model_package(model, progress=False)[0] is not None
    yield folder
    if old is None:
        del os.environ[aot.CACHE_ENV]
    else:
        os.environ[aot.CACHE_ENV] = old


@pytest.mark.parametrize("kind", ["eager", "packaged"])
def test_batch_runner_logits_match_the_solo_runner(models, request, kind):
    """Rows of different lengths, trees of different sizes, a rewind that leaves stale slots, a row
    left out of a step, and a dropped row: each row's logits are the solo runner's, on a
    `DynamicCache` and on the compiled package's buffers."""
    target = models["target"]
    if kind == "packaged":
        request.getfixturevalue("packaged")
    batch = make_batch_runner(target, [0, 1, 2], fast=kind == "packaged")
    assert (batch.package is not None) == (kind == "packaged")
    solos = {row: ModelRunner(target) for row in range(3)}
    sequences = {row: list(PROMPTS[row]) for row in range(3)}

    def tree(row, size):  # size -1: no tree, the row feeds its one pending token
        t = DraftTree()
        if size < 0:
            return t
        t.add_chain([(row + k) % VOCAB for k in range(size)])
        t.add_chain([(row * 5 + 1) % VOCAB])
        return t

    def step(rows, sizes):
        steps = {row: (batch.rewind(row, sequences[row]), tree(row, sizes[row])) for row in rows}
        logits = batch.forward(steps)
        for row in rows:
            expected = solos[row].forward(solos[row].rewind(sequences[row]), steps[row][1])
            assert torch.allclose(logits[row], expected, atol=1e-5), row
            path = [0, 1][:max(sizes[row], 0)]
            batch.keep(row, path)
            solos[row].keep(path)
            assert batch.tokens[row] == solos[row].tokens
            sequences[row] = sequences[row] + [steps[row][1].tokens[n] for n in path] + [row + 40]

    step([0, 1, 2], {0: 3, 1: 0, 2: 5})
    sequences[1] = sequences[1][:-4]  # a rewind: its cached slots past here are stale, must stay hidden
    step([0, 1, 2], {0: 1, 1: 4, 2: 2})
    step([0, 2], {0: 2, 2: 6})  # row 1 sits out
    batch.drop([0])
    step([1, 2], {1: 3, 2: 1})
    assert batch.rows == [1, 2] and batch.cache.layers[0].keys.shape[0] == 2
    batch.add(3)  # a row joins with a long prompt: on the packages it is fed alone, at its own slots
    solos[3], sequences[3] = ModelRunner(target), prompt(9, 90)
    forwards = batch.forwards
    step([1, 2, 3], {1: 2, 2: 0, 3: 1})
    assert batch.forwards - forwards == (2 if kind == "packaged" else 1)
    step([1, 2, 3], {1: 1, 2: 3, 3: 2})
    step([1, 2, 3], {1: -1, 2: -1, 3: -1})  # plain decoding: one token a row (padded to two on the packages)
    batch.drop([3])
    longest, capacity = max(len(batch.tokens[row]) for row in batch.rows), batch.cache.layers[0].keys.shape[2]
    if kind == "eager":
        assert capacity == longest
    else:  # grown in steps, never far past the longest row: the CPU's attention reads every slot
        assert capacity % CAPACITY_STEP == 0 and longest <= capacity < longest + CAPACITY_STEP + 16


@pytest.mark.parametrize("sized", [True, False])
def test_packaged_rows_match_hf_greedy_without_the_models_own_forward(models, eos_case, packaged, sized):
    """fast=True: every row on the compiled packages is its HF greedy output, and neither model's own
    forward runs (the forwards are the packages')."""
    target, draft = models["target"], models["perturbed"]
    eos, expected = eos_case
    calls = []
    hooks = [model.register_forward_hook(lambda *args: calls.append(1)) for model in (target, draft)]
    try:
        outs = {method: generate_batch(target, PROMPTS, draft=draft, method=method, max_new_tokens=24, eos_token_id=eos,
                                       pad_token_id=PAD, fast=True, size_by_load=sized) for method in BATCHED}
    finally:
        for hook in hooks:
            hook.remove()
    assert not calls
    for method, out in outs.items():
        assert [new_tokens(out, i, len(row)) for i, row in enumerate(PROMPTS)] == expected, method


def test_prompts_longer_than_a_package_forward_are_fed_in_chunks(models, packaged, monkeypatch):
    """A forward wider than the package takes (a long prompt) is fed as chunks of the pending tokens
    first, kept whole: the logits are the solo runner's, and whole generations stay exact."""
    monkeypatch.setattr(batch_runner, "PACKAGE_MAX_TOKENS", 8)
    target = models["target"]
    batch = make_batch_runner(target, [0, 1], fast=True)
    tree = DraftTree()
    tree.add_chain([5, 6])
    steps = {0: (batch.rewind(0, PROMPTS[1]), DraftTree()), 1: (batch.rewind(1, PROMPTS[0]), tree)}
    logits = batch.forward(steps)
    assert [record.fed for record in batch.log] == [2 * 8, 2 * 4, 2 * 8]  # 20 tokens: 8, 4, then the last 8
    for row, prompt_ in ((0, PROMPTS[1]), (1, PROMPTS[0])):
        solo = ModelRunner(target)
        assert torch.allclose(logits[row], solo.forward(solo.rewind(prompt_), steps[row][1]), atol=1e-5)
    for method in ("vanilla", "prompt_lookup"):
        out = generate_batch(target, PROMPTS, method=method, max_new_tokens=12, eos_token_id=[], pad_token_id=PAD,
                             fast=True)
        assert [new_tokens(out, i, len(row)) for i, row in enumerate(PROMPTS)] == [
            hf_greedy(target, row, 12) for row in PROMPTS]


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4)), "input_ids' shape"),
    (dict(prompts=torch.ones(2, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]])),
     "row 0 has padding after a token"),
    (dict(prompts=torch.ones(2, 3, dtype=torch.long), attention_mask=torch.tensor([[0, 0, 0], [1, 1, 1]])),
     "row 0 of attention_mask is all padding"),
    (dict(prompts=torch.ones(2, 3, dtype=torch.long), attention_mask=torch.tensor([[0, 2, 1], [1, 1, 1]])),
     "only 0"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[[1, 2], [3, 99]]), "outside the target's vocabulary"),
    (dict(prompts=[[1, 2], [3]], attention_mask=torch.ones(2, 2)), "not with a list"),
    (dict(prompts=[[1, 2], [3]], streamer=object()), "streamer"),
    (dict(prompts=[[1, 2], [3]], pad_token_id=-1), "pad_token_id"),
])
def test_bad_batches_are_refused(models, kwargs, message):
    args = dict(draft=models["perturbed"], max_new_tokens=2, eos_token_id=[], pad_token_id=PAD)
    args.update(kwargs)
    with pytest.raises(InvalidArgumentError, match=message):
        generate_batch(models["target"], args.pop("prompts"), **args)


@pytest.mark.parametrize("method", DRAFTING + ["prompt_lookup"])
@pytest.mark.parametrize("kind", ["eager", "packaged"])
def test_rows_joining_mid_way_and_cancelled_rows_leave_the_others_exact(models, request, method, kind):
    """A session (continuous batching): rows join after some steps, one is cancelled mid-way and
    freed at once; every other row is exactly its solo output, and the session ends empty. On the
    packages a long joining prompt runs alone, not widening the others' forward to its length."""
    target, draft = models["target"], models["perturbed"]
    if kind == "packaged":
        request.getfixturevalue("packaged")
    long = prompt(9, 4 * 16 + 6)  # over 4x the widest step of a row (its verify budget)
    with BatchSession(target, draft, method=method, fast=kind == "packaged") as session:
        first = [session.add(PROMPTS[i], max_new_tokens=16) for i in (0, 1)]
        for _ in range(3):
            session.step()
        joined, cancelled = session.add(long, max_new_tokens=16), session.add(PROMPTS[3], max_new_tokens=16)
        session.step()
        if kind == "packaged":
            (record,) = session.runner.row_log(joined)  # one row's forward: its prompt and first draft
            assert len(long) <= record.fed < len(long) + 16
        session.cancel(cancelled)
        assert cancelled not in session.active and len(session.runner.rows) == len(session.active)
        while session.active:
            session.step()
    assert session.runner.rows == [] and session.rows[cancelled].finish == "cancelled"
    for row, tokens in zip(first + [joined], (PROMPTS[0], PROMPTS[1], long)):
        assert session.rows[row].new_tokens == hf_greedy(target, tokens, 16), (method, row)
        assert session.rows[row].finish == "length"
    stopped = session.rows[cancelled].new_tokens
    assert 0 < len(stopped) < 16 and stopped == hf_greedy(target, PROMPTS[3], 16)[:len(stopped)]
