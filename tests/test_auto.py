"""method="auto": exact whatever it chooses, and it chooses by what each choice is observed to cost."""

import json
from types import SimpleNamespace

import pytest
import torch
from tiny_models import perturbed, tiny_model
from transformers import LlamaForCausalLM

import ouroboros.proposers.auto as auto_module
import ouroboros.runner
from ouroboros import generate
from ouroboros.costs import CostTable, ModelCosts
from ouroboros.proposers.auto import PROBE_STEPS

VOCAB = 61
PROMPT = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]])


class SimulatedClock:
    """Seconds that pass only when a `Delayed` forward says so: auto's choices then depend on the
    simulated costs alone, not on how busy the machine running the tests is."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def built_autos(monkeypatch, **kwargs) -> list:
    """The AutoProposers that generate builds from now on (with `kwargs` added), in a list."""
    built, real = [], auto_module.AutoProposer

    def make(*args, **more):
        built.append(real(*args, **kwargs, **more))
        return built[-1]

    monkeypatch.setattr(auto_module, "AutoProposer", make)
    return built


@pytest.fixture
def clock(monkeypatch):
    """One simulated clock for auto's step timing (its `clock`) and the runners' forward log."""
    simulated = SimulatedClock()
    built_autos(monkeypatch, clock=simulated)
    monkeypatch.setattr(ouroboros.runner, "time", SimpleNamespace(perf_counter=simulated))
    return simulated


class Delayed(LlamaForCausalLM):
    """A stock Llama whose every forward takes `delay` simulated seconds: a slow device, on demand."""

    delay = 0.0
    clock: SimulatedClock

    def forward(self, *args, cache=None, **kwargs):
        self.clock.now += self.delay
        return super().forward(*args, cache=cache, **kwargs)


def delayed(model, delay, clock):
    copy = Delayed(model.config).eval()
    copy.load_state_dict(model.state_dict())
    copy.generation_config.eos_token_id = model.generation_config.eos_token_id
    copy.delay, copy.clock = delay, clock
    return copy


def synthetic(target_one, target_slope, draft_one, prefill_per_token=0.001, draft_slope=None):
    """A cost table (ms) with forward(k) = one + slope * (k - 1) at every cache length."""
    def costs(one, slope):
        row = {k: one + slope * (k - 1) for k in (1, 2, 4, 8, 16, 32)}
        prefill = {p: p * prefill_per_token * 1000 for p in (16, 1024)}
        return ModelCosts({64: row, 512: row}, prefill)
    return CostTable(costs(target_one, target_slope), costs(draft_one, draft_one * 0.01 if draft_slope is None
                                                            else draft_slope))


def greedy(target, ids, n):
    return target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                           eos_token_id=None, pad_token_id=0)


@pytest.mark.parametrize("draft_kind", ["none", "same", "perturbed", "other"])
def test_auto_equals_greedy_generate(draft_kind):
    target = tiny_model("llama", seed=0, vocab=VOCAB)
    draft = {"none": None, "same": target, "perturbed": perturbed(target, scale=0.05),
             "other": tiny_model("llama", seed=7, vocab=VOCAB)}[draft_kind]
    ref = greedy(target, PROMPT, 50)
    for n in (1, 2, 17, 50):
        out = generate(target, PROMPT, draft=draft, method="auto", max_new_tokens=n, eos_token_id=[])
        assert torch.equal(out.sequences, ref[:, :PROMPT.shape[1] + n]), (draft_kind, n)
        assert out.stats.plan.startswith("auto: ")
        assert sum(v for k, v in out.stats.events.items() if k.startswith("auto_") and k.endswith("_steps")) == \
            out.stats.target_forwards


def test_a_draft_slower_than_it_saves_is_dropped_and_output_stays_exact(clock):
    """The plan (from a table that calls the draft cheap) starts with the draft; the draft is in
    fact slow (40 ms a forward against 4 ms for the target), so auto falls back after seeing it."""
    target = delayed(tiny_model("llama", seed=0, vocab=VOCAB), 0.004, clock)
    draft = delayed(perturbed(target, scale=0.05), 0.040, clock)
    optimistic = synthetic(target_one=4, target_slope=0.02, draft_one=0.2)
    out = generate(target, PROMPT, draft=draft, method="auto", max_new_tokens=60, eos_token_id=[], costs=optimistic)
    assert {(r.model, round(r.seconds, 9)) for r in out.stats.forward_log} == {("target", 0.004), ("draft", 0.040)}
    assert out.stats.plan_start == "ouroboros"
    assert f"{out.stats.plan_start}" == str(out.stats.plan_start) == json.loads(json.dumps(out.stats.plan_start))
    assert torch.equal(out.sequences, greedy(target, PROMPT, 60))
    events = out.stats.events
    assert events.get("auto_fallbacks", 0) + events.get("auto_switches", 0) >= 1
    # the first step (with the target's prefill) is not judged; the start arm's PROBE_STEPS judged
    # steps show the draft is slow; later the draft runs only in probes
    assert events.get("auto_ouroboros_steps", 0) <= 1 + PROBE_STEPS * (1 + events.get("auto_probes", 0)), events
    assert out.stats.target_forwards - events.get("auto_ouroboros_steps", 0) > events.get("auto_ouroboros_steps", 0)


def test_auto_returns_to_the_draft_once_it_pays(clock):
    """A draft that is slow for its first forwards and then fast (a cold cache, another tenant
    leaving): auto probes it again later and moves back to it."""
    # a model and prompt whose output seldom repeats itself, so context n-grams cannot stand in
    target = delayed(tiny_model("llama", seed=2, vocab=1000, hidden=64), 0.010, clock)
    draft = delayed(target, 0.050, clock)  # the target's own weights: every draft is accepted
    prompt = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(1))
    forwards = {"n": 0}

    def slow_then_fast(module, args, kwargs):
        forwards["n"] += 1
        module.delay = 0.050 if forwards["n"] <= 12 else 0.0

    draft.register_forward_pre_hook(slow_then_fast, with_kwargs=True)
    table = synthetic(target_one=10, target_slope=0.05, draft_one=0.5)
    out = generate(target, prompt, draft=draft, method="auto", max_new_tokens=120, eos_token_id=[], costs=table)
    assert torch.equal(out.sequences, greedy(target, prompt, 120))
    events = out.stats.events
    assert events.get("auto_probes", 0) >= 1 and events.get("auto_ouroboros_steps", 0) >= 5, events
    assert out.stats.mean_accepted > 2


def test_where_extra_tokens_cost_full_price_auto_plans_plain_decoding_and_never_runs_a_useless_draft():
    """AVX2-like costs (k tokens cost k times one) and an unrelated draft: plain decoding from the
    start, and the draft model never runs, not even its prefill."""
    target = tiny_model("llama", seed=0, vocab=VOCAB)
    useless = tiny_model("llama", seed=7, vocab=VOCAB)
    avx2 = synthetic(target_one=100, target_slope=100, draft_one=40)
    out = generate(target, PROMPT, draft=useless, method="auto", max_new_tokens=60, eos_token_id=[], costs=avx2)
    assert out.stats.plan.startswith("auto: vanilla")
    assert out.stats.draft_forwards == 0
    assert torch.equal(out.sequences, greedy(target, PROMPT, 60))


def test_a_draft_predicted_slower_than_plain_decoding_is_never_tried(monkeypatch):
    """Costs like this host's held to AVX2 (two tokens cost 1.6x one, the draft 0.36 of the target):
    the plan puts the draft at 0.89x plain decoding, near enough that patience alone would probe it
    after two steps; but a draft that has not run is tried only where it is predicted to pay, so
    neither its prefill nor a probe is spent."""
    autos = built_autos(monkeypatch)
    target = tiny_model("llama", seed=0, vocab=VOCAB)
    out = generate(target, PROMPT, draft=perturbed(target, scale=0.02), method="auto", max_new_tokens=60,
                   eos_token_id=[], costs=synthetic(target_one=100, target_slope=60, draft_one=36))
    rates = {arm: estimate.rate for arm, estimate in autos[0].plan.estimates.items()}
    assert autos[0].plan.start == out.stats.plan_start == "vanilla"
    assert rates["ouroboros"] / rates["vanilla"] == pytest.approx(0.89, abs=0.005)
    assert type(autos[0])._first_patience(rates["vanilla"], rates["ouroboros"]) <= 2
    assert "plain decoding" in out.stats.plan
    assert out.stats.draft_forwards == 0 and out.stats.events.get("auto_probes", 0) == 0
    assert torch.equal(out.sequences, greedy(target, PROMPT, 60))


@pytest.mark.parametrize(("draft_slope", "phrase_drafting"), [(0.3, True), (18, False)])
def test_the_draft_arm_drafts_phrases_only_where_its_wider_forward_is_free(draft_slope, phrase_drafting):
    """A Jacobi drafting forward feeds the draft several tokens: worth it where that costs about one
    token's forward (AVX-512-bf16, GPUs), not where each token costs 0.6 of one more (AVX2)."""
    from ouroboros.config import OuroborosConfig
    from ouroboros.planning import plan

    table = synthetic(target_one=100, target_slope=0.5, draft_one=30, draft_slope=draft_slope)
    chosen = plan(table, 16, 128, acceptance=0.75, base=OuroborosConfig(), has_draft=True)
    assert chosen.config.phrase_drafting is phrase_drafting


@pytest.mark.parametrize(("draft_ms", "start"), [(40, "ouroboros"), (50, "ouroboros"), (70, "prompt_lookup")])
def test_the_draft_starts_where_its_floor_comes_near_prompt_lookups_guess(draft_ms, start):
    """Prompt lookup's rate before decoding is a guess that shadowing corrects for free while the
    draft runs; the draft's is a floor that only running it can correct. So the draft starts when
    its floor beats plain decoding and is within LOOKUP_DOUBT of lookup's guess, and only then."""
    from ouroboros.config import OuroborosConfig
    from ouroboros.planning import LOOKUP_DOUBT, plan

    chosen = plan(synthetic(target_one=100, target_slope=0.5, draft_one=draft_ms), 16, 128, acceptance=0.75,
                  base=OuroborosConfig(), has_draft=True)
    rates = {arm: estimate.rate for arm, estimate in chosen.estimates.items()}
    assert chosen.start == start, rates
    assert rates["ouroboros"] > rates["vanilla"]
    if draft_ms == 50:  # the case the rule is for: lookup's guess is ahead, by less than the doubt
        assert rates["ouroboros"] < rates["prompt_lookup"] <= LOOKUP_DOUBT * rates["ouroboros"]
    if start == "prompt_lookup":
        assert LOOKUP_DOUBT * rates["ouroboros"] < rates["prompt_lookup"]


def test_a_draft_prefill_that_costs_more_than_it_can_save_is_skipped():
    """Free extra tokens, but a long prompt whose draft prefill (here 10 s) dwarfs a short answer."""
    target = tiny_model("llama", seed=0, vocab=VOCAB)
    draft = perturbed(target, scale=0.02)
    costly_prefill = synthetic(target_one=100, target_slope=0.5, draft_one=30, prefill_per_token=0.625)
    out = generate(target, PROMPT, draft=draft, method="auto", max_new_tokens=8, eos_token_id=[],
                   costs=costly_prefill)
    assert "draft prefill" in out.stats.plan and not out.stats.plan.startswith("auto: ouroboros")
    assert out.stats.draft_forwards == 0


def test_arms_are_typed_and_read_as_their_plain_names():
    """Arm is a str enum: event names, the plan's line and plan_start read "ouroboros", not "Arm.OUROBOROS";
    a plain name given for an arm becomes its Arm, and an unknown one is refused."""
    from ouroboros.config import OuroborosConfig
    from ouroboros.planning import Arm, Estimate, Plan

    assert f"auto_{Arm.OUROBOROS}_steps" == "auto_ouroboros_steps" and str(Arm.PROMPT_LOOKUP) == "prompt_lookup"
    plan = Plan("ouroboros", OuroborosConfig(), estimates={"vanilla": Estimate(1, 0.1)})
    assert plan.start is Arm.OUROBOROS and list(plan.estimates) == [Arm.VANILLA]
    assert plan.line().startswith("auto: ouroboros")
    with pytest.raises(ValueError):
        Plan("lookahead", None)


def test_arms_without_a_draft_are_shadowed_not_probed():
    """Running plain decoding on a context that repeats itself, auto sees from the tokens the target
    emits what prompt lookup would have drafted, and moves to it without a trial step."""
    from ouroboros.acceptance import StepResult
    from ouroboros.planning import Estimate, Plan
    from ouroboros.proposers.auto import AutoProposer, _yield
    from ouroboros.proposers.base import Context, NullProposer
    from ouroboros.proposers.prompt_lookup import PromptLookupProposer
    from ouroboros.sizing import CostCurve

    now = [0.0]
    flat = CostCurve({1: 0.1, 2: 0.1, 4: 0.1, 8: 0.1})
    plan = Plan("vanilla", None, 4, {"vanilla": Estimate(1, 0.1), "prompt_lookup": Estimate(1, 0.2)},
                target_curve=flat)
    auto = AutoProposer({"vanilla": NullProposer(), "prompt_lookup": PromptLookupProposer(4, 2)}, plan,
                        clock=lambda: now[0])
    pattern = [5, 6, 7, 8, 9]
    context = Context(pattern * 3, 100)
    chosen = []
    for _ in range(10):
        proposal = auto.propose(context)
        chosen.append(proposal.arm)
        size = proposal.tree.size
        emitted = (pattern * 4)[len(context.tokens) % 5:][:size + 1]  # the target continues the pattern
        now[0] += 0.1
        auto.learn(context, proposal, StepResult(emitted, list(range(size)), []))
        context.tokens += emitted
    assert chosen[:2] == ["vanilla", "vanilla"] and chosen[-1] == "prompt_lookup", chosen
    assert auto.events.get("auto_probes", 0) == 0
    assert auto.estimates["prompt_lookup"].rate > 2 * auto.estimates["vanilla"].rate
    # what a shadowed chain yields: its prefix shared with the emitted tokens, plus the target's token
    assert _yield((1, 2, 3), [1, 2, 9, 4]) == 3
    assert _yield((1, 2), [1, 2, 3]) == 3
    assert _yield((), [4]) == 1
    assert _yield((1, 2, 3, 4), [1, 2]) == 2  # beyond what was emitted nothing is known


class ScriptedDraftArm:
    """A draft-model arm without a model: one drafted token a step, each draft forward logged as
    taking `seconds` (what auto reads the draft's share of a step from)."""

    def __init__(self, seconds, clock):
        from collections import Counter
        from types import SimpleNamespace

        self.events = Counter()
        self.draft_runner = SimpleNamespace(forwards=1, log=[])
        self.seconds, self.clock = seconds, clock

    def propose(self, context):
        from ouroboros.proposers.base import Proposal
        from ouroboros.runner import ForwardRecord
        from ouroboros.tree import DraftTree

        self.draft_runner.log.append(ForwardRecord("draft", 1, len(context.tokens), self.seconds, self.clock()))
        tree = DraftTree()
        return Proposal(tree, trunk=tuple(tree.add_chain([7])))

    def learn(self, context, proposal, result):
        pass


def scripted_run(draft_seconds, steps=14):
    """auto started on a draft arm whose every step emits 1 token (its draft rejected) in a 0.1 s
    target forward plus `draft_seconds` of drafting; plain decoding would emit the same token in
    0.1 s. Returns the arm of each step."""
    from ouroboros.acceptance import StepResult
    from ouroboros.planning import Estimate, Plan
    from ouroboros.proposers.auto import AutoProposer
    from ouroboros.proposers.base import Context, NullProposer
    from ouroboros.sizing import CostCurve

    now = [0.0]
    plan = Plan("ouroboros", None, 4, {"vanilla": Estimate(1, 0.1), "ouroboros": Estimate(2, 0.1)},
                target_curve=CostCurve({1: 0.1, 2: 0.1, 4: 0.1}))
    draft = ScriptedDraftArm(draft_seconds, lambda: now[0])
    auto = AutoProposer({"vanilla": NullProposer(), "ouroboros": draft}, plan, clock=lambda: now[0])
    context, chosen = Context(list(range(16)), 100), []
    for _ in range(steps):
        proposal = auto.propose(context)
        chosen.append(proposal.arm)
        now[0] += 0.1 + (draft_seconds if proposal.arm == "ouroboros" else 0.0)
        emitted = [100 + len(context.tokens)]
        auto.learn(context, proposal, StepResult(emitted, [], [emitted[0]] * (proposal.tree.size + 1)))
        context.tokens += emitted
    return chosen


def test_the_draft_arm_is_left_only_for_a_clear_gain_after_its_start_steps():
    """Leaving a draft arm is dear to undo (a probe, FIRST_PROBE steps later, and the draft's
    catch-up), so plain decoding 1.2x faster does not take over, while 1.5x does; and not before
    the start arm has had PROBE_STEPS judged steps, however bad the first of them."""
    from ouroboros.proposers.auto import LEAVE_MARGIN, SWITCH_MARGIN

    assert SWITCH_MARGIN < 1.2 < LEAVE_MARGIN < 1.5
    assert scripted_run(draft_seconds=0.02) == ["ouroboros"] * 14
    clear = scripted_run(draft_seconds=0.05)
    assert clear[:PROBE_STEPS + 1] == ["ouroboros"] * (PROBE_STEPS + 1)
    assert clear[PROBE_STEPS + 1:PROBE_STEPS + 8] == ["vanilla"] * 7, clear  # until its next probe
