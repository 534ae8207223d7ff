"""The generation loop: propose, verify in one target forward, learn, emit; until EOS or budget."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .acceptance import Sampler, greedy_verify
from .config import OuroborosConfig
from .cost_cache import check_against_run, cost_table
from .costs import CostTable
from .errors import InvalidArgumentError, InvalidTypeError
from .methods import METHODS, Setup, get_method
from .model_facts import context_length, eos_token_ids, vocab_size
from .pool import PhrasePool
from .proposers import Context
from .runner import ForwardRecord, check_tree_attention, decode_step
from .static_runner import make_runner

MIN_TEMPERATURE = 1e-6
"""Below this, logits / temperature can overflow float32; 0 (greedy) is the limit users mean."""

__all__ = ["METHODS", "GenerationOutput", "GenerationStats", "generate", "make_verifier"]


@dataclass
class GenerationStats:
    target_forwards: int = 0
    draft_forwards: int = 0
    new_tokens: int = 0
    accept_lengths: list[int] = field(default_factory=list)
    """Tokens emitted per target forward (the first forward includes the prefill)."""
    wall_time: float = 0.0
    """Seconds for the whole call, prefill included (and any compiling and cost measuring below)."""
    compile_seconds: float = 0.0
    """Of `wall_time`: forwards that compiled a graph first (the fast path's first use of a shape)."""
    measure_seconds: float = 0.0
    """Of `wall_time`: measuring this machine's forward costs (auto's first use on a machine)."""
    events: dict[str, int] = field(default_factory=dict)
    """Acceptance paths taken: trunk_full, trunk_partial, branch_accepted, branch_rejected,
    phrase_accepted / phrase_rejected (pool phrases checked by a Jacobi step), draft_free (steps
    verified without the draft model), spread_accepted (a spread branch was accepted)."""
    plan: str = ""
    """How `method="auto"` chose its start, in one line (empty for the other methods)."""
    plan_start: str = ""
    """The arm auto started with ("vanilla", "prompt_lookup", "ouroboros"; empty for other methods)."""
    forward_log: list[ForwardRecord] = field(default_factory=list)
    """Every forward of both models, in order: model, tokens fed, tokens cached, seconds."""

    @property
    def mean_accepted(self) -> float:
        return self.new_tokens / max(self.target_forwards, 1)

    @property
    def decode_time(self) -> float:
        """Seconds spent generating: `wall_time` less compiling and cost measuring, which are one-off."""
        return max(self.wall_time - self.compile_seconds - self.measure_seconds, 0.0)

    @property
    def tokens_per_second(self) -> float:
        """New tokens per second of `decode_time` (compiling and cost measuring are not counted)."""
        return self.new_tokens / self.decode_time if self.decode_time > 0 else 0.0


@dataclass
class GenerationOutput:
    sequences: torch.LongTensor
    """[1, prompt_len + new_len], prompt included, like transformers' generate."""
    stats: GenerationStats
    finish_reason: str = "length"
    """"stop" (EOS or a stopping callback) or "length" (max_new_tokens reached)."""


def generate(
    target,
    input_ids: torch.Tensor,
    *,
    draft=None,
    method: str = "ouroboros",
    max_new_tokens: int = 128,
    eos_token_id: int | Sequence[int] | None = None,
    config: OuroborosConfig | None = None,
    pool: PhrasePool | None = None,
    streamer=None,
    stopping: Callable[[list[int]], bool] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    costs: CostTable | None = None,
    fast: bool | None = None,
) -> GenerationOutput:
    """Generate with `method`; the output is exactly the target's own decoding.

    Greedy (default, or temperature=0) equals `target.generate(do_sample=False)` token for token.
    With `do_sample=True`, every output sequence has exactly the distribution of sampling from the
    target alone with the same warpers (temperature, top_k, top_p, min_p; applied in transformers'
    order; unlike transformers, nothing is read from `generation_config`: top_k=0 means off).
    `seed` (or a CPU `generator`) makes sampling reproducible run to run.

    `fast` picks the runner: True the compiled static-cache fast path, False the eager one, None
    (default) the fast path where it is expected to pay on this device (`static_runner.make_runner`).
    `method="auto"` picks and switches the drafting per step (see `proposers.auto`); it uses `costs`
    (a `CostTable` of this machine) or measures and caches the models' costs on first use.
    `pool=None` starts a fresh phrase pool (cold); pass a `PhrasePool` to carry phrases across calls
    (warm). `streamer` follows transformers' protocol (`put`, `end`). `stopping(new_tokens)` is
    called after each step with all new tokens so far; returning True ends generation there.
    """
    config = OuroborosConfig() if config is None else config
    prompt = _validate(target, input_ids, draft, method, max_new_tokens, config, pool)
    verify = make_verifier(do_sample, temperature, top_k, top_p, min_p, seed, generator)
    eos = set(eos_token_ids(target, eos_token_id))
    stats = GenerationStats()
    start = time.perf_counter()
    spec = get_method(method)
    own_costs = spec.needs_costs and costs is None
    with torch.inference_mode():
        if own_costs:  # before the runners: on the fast path they reuse the measuring runners' buffers and graphs
            costs = cost_table(target, draft if spec.takes_draft else None, fast=fast)
            stats.measure_seconds = costs.meta.get("measure_seconds", 0.0)
        runner = make_runner(target, fast=fast, role="target")
        pool = PhrasePool(config.level, config.pool_size) if pool is None else pool
        draft_runner = make_runner(draft, fast=fast, role="draft") if spec.takes_draft and draft is not None else None
        proposer = spec.build(Setup(list(prompt), config, pool, draft_runner, target, max_new_tokens, costs, fast))
        if streamer is not None:
            streamer.put(input_ids.detach().reshape(1, -1).cpu())
        context = Context(list(prompt), max_new_tokens)
        finish = "length"
        while context.remaining > 0:
            proposal = proposer.propose(context)
            result = decode_step(runner, context.tokens, proposal.tree, verify)
            proposer.learn(context, proposal, result)
            emitted = result.emitted[:context.remaining]
            ends = [i for i, token in enumerate(emitted) if token in eos]
            if ends:
                emitted = emitted[:ends[0] + 1]
            context.tokens += emitted
            context.remaining -= len(emitted)
            stats.accept_lengths.append(len(emitted))
            if streamer is not None:
                streamer.put(torch.tensor(emitted))
            if ends or (stopping is not None and stopping(context.tokens[len(prompt):])):
                finish = "stop"
                break
        if streamer is not None:
            streamer.end()
    stats.wall_time = time.perf_counter() - start
    draft_log = proposer.draft_runner.log if proposer.draft_runner is not None else []
    stats.target_forwards = runner.forwards
    stats.draft_forwards = len(draft_log)
    stats.forward_log = sorted(runner.log + draft_log, key=lambda record: record.started)
    stats.compile_seconds = runner.compile_seconds + (
        proposer.draft_runner.compile_seconds if proposer.draft_runner is not None else 0.0)
    if costs is not None:
        check_against_run(costs, stats.forward_log)
    stats.events = dict(proposer.events)
    if getattr(proposer, "plan", None) is not None:
        stats.plan = proposer.plan.line()
        stats.plan_start = proposer.plan.start
    stats.new_tokens = len(context.tokens) - len(prompt)
    sequences = torch.tensor([context.tokens], dtype=torch.long, device=input_ids.device)
    return GenerationOutput(sequences, stats, finish)


def make_verifier(do_sample, temperature, top_k, top_p, min_p, seed, generator):
    """Validate the sampling settings; return the verification rule (greedy or a Sampler)."""
    def number(name, value, low, high, low_open=False):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise InvalidTypeError(f"{name} must be a number, got {value!r}")
        if value < low or value > high or (low_open and value == low):
            bounds = f"{'(' if low_open else '['}{low}, {high}]"
            raise InvalidArgumentError(f"{name} must be in {bounds}, got {value}")

    if not isinstance(do_sample, bool):
        raise InvalidTypeError(f"do_sample must be a bool, got {do_sample!r}")
    number("temperature", temperature, 0.0, math.inf)
    if 0 < temperature < MIN_TEMPERATURE:
        raise InvalidArgumentError(f"temperature {temperature} is too small to sample from (logits / temperature "
                                   f"overflow): use 0 for greedy decoding or a value >= {MIN_TEMPERATURE}")
    number("top_p", top_p, 0.0, 1.0, low_open=True)
    number("min_p", min_p, 0.0, 1.0)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise InvalidArgumentError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidTypeError(f"seed must be an int or None, got {seed!r}")
    if seed is not None and generator is not None:
        raise InvalidArgumentError("give either seed or generator, not both")
    if not do_sample:
        return greedy_verify
    if temperature == 0:
        warnings.warn("do_sample=True with temperature=0: temperature 0 wins, decoding greedily", stacklevel=3)
        return greedy_verify
    if generator is None:
        generator = torch.Generator()
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
    return Sampler(temperature, top_k, top_p, min_p, generator).verify


def _validate(target, input_ids, draft, method, max_new_tokens, config, pool) -> list[int]:
    """Check every argument before any forward; return the prompt as a list of ids."""
    spec = get_method(method)
    if not isinstance(config, OuroborosConfig):
        raise InvalidTypeError(f"config must be an OuroborosConfig, got {type(config).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidArgumentError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(input_ids, torch.Tensor):
        raise InvalidTypeError("input_ids must be a torch.LongTensor of shape [1, length], "
                               f"got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
        raise InvalidTypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() == 2 and input_ids.shape[0] != 1:
        raise InvalidArgumentError(f"input_ids has a batch of {input_ids.shape[0]} sequences; only batch size 1 is "
                         "supported for now (batching is planned): call generate once per sequence")
    if input_ids.dim() not in (1, 2):
        raise InvalidArgumentError(f"input_ids must have shape [1, length] or [length], got {tuple(input_ids.shape)}")
    prompt = input_ids.reshape(-1).tolist()
    if not prompt:
        raise InvalidArgumentError("the prompt is empty: give at least one token")
    vocab = vocab_size(target)
    if min(prompt) < 0 or max(prompt) >= vocab:
        raise InvalidArgumentError(f"input_ids hold ids outside the target's vocabulary [0, {vocab})")
    limit = context_length(target)
    if limit is not None and len(prompt) + max_new_tokens > limit:
        raise InvalidArgumentError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                                   f"target's context of {limit} tokens")
    if spec.needs_draft and draft is None:
        raise InvalidArgumentError(f"method {method!r} needs a draft model: pass draft=...")
    if spec.takes_draft and draft is not None:
        if vocab_size(draft) != vocab:
            raise InvalidArgumentError(f"the draft's vocabulary ({vocab_size(draft)}) differs from the target's "
                                       f"({vocab}): the models must share one tokenizer")
        draft_limit = context_length(draft)
        if draft_limit is not None and len(prompt) + max_new_tokens > draft_limit:
            raise InvalidArgumentError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                                       f"the draft's context of {draft_limit} tokens")
    if pool is not None:
        if not isinstance(pool, PhrasePool):
            raise InvalidTypeError(f"pool must be a PhrasePool or None, got {type(pool).__name__}")
        if pool.level != config.level:
            raise InvalidArgumentError(f"the pool holds {pool.level}-grams but config.level is {config.level}")
    check_tree_attention(target)
    if spec.takes_draft and draft is not None:
        check_tree_attention(draft)
    return prompt
