"""The generation loop: propose, verify in one target forward, learn, emit; until EOS or budget."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .config import OuroborosConfig
from .costs import CostTable
from .engine import Engine, engine_for
from .errors import InvalidArgumentError
from .methods import METHODS, Setup, get_method
from .model_facts import eos_token_ids
from .pool import PhrasePool
from .proposers import Context, Planned
from .request import GenerationStats, emit, make_verifier, validate
from .runner import decode_step
from .vocab_subset import DEFAULT_SIZE

if TYPE_CHECKING:
    from .batch_generation import BatchGenerationOutput

__all__ = ["METHODS", "GenerationOutput", "GenerationStats", "generate", "make_verifier"]


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
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    engine: Engine | None = None,
    draft_vocab: int | None = DEFAULT_SIZE,
) -> GenerationOutput | BatchGenerationOutput:
    """Generate with `method`; the output is exactly the target's own decoding.

    Greedy (default, or temperature=0) equals `target.generate(do_sample=False)` token for token.
    With `do_sample=True`, every output sequence has exactly the distribution of sampling from the
    target alone with the same warpers (temperature, top_k, top_p, min_p; applied in transformers'
    order; unlike transformers, nothing is read from `generation_config`: top_k=0 means off).
    `seed` (or a CPU `generator`) makes sampling reproducible run to run.

    `fast` picks the runner: True the compiled static-cache fast path, False the eager one, None
    (default) the fast path where it is expected to pay on this device (`static_runner.make_runner`).
    The runners and cost tables come from `engine` (an `engine.Engine` of this target and draft), by
    default the one cached for (target, draft, fast, draft_vocab). `draft_vocab`: how many ids the
    draft model's output layer computes logits for (`vocab_subset`: the cheaper draft forward, same
    output; 0 or None for all). `method="auto"` picks and switches the drafting
    per step (see `proposers.auto`); it uses `costs` (a `CostTable` of this machine) or the engine's
    (measured and cached on first use).
    `pool=None` starts a fresh phrase pool (cold); pass a `PhrasePool` to carry phrases across calls
    (warm). `streamer` follows transformers' protocol (`put`, `end`). `stopping(new_tokens)` is
    called after each step with all new tokens so far; returning True ends generation there.

    A batch (a list of token-id lists, input_ids with more than one row, or input_ids with an
    `attention_mask` marking left padding) goes to `batch_generation.generate_batch` and returns a
    `BatchGenerationOutput` (sequences [rows, length] padded with `pad_token_id`, per-row stats and
    finish reasons); each row is exactly what this function gives for it alone.
    """
    from .batch_generation import generate_batch, is_batch  # imported here: that module imports this one

    engine = _engine(target, draft, fast, engine, draft_vocab)
    if is_batch(input_ids, attention_mask):
        return generate_batch(target, input_ids, attention_mask=attention_mask, draft=draft, method=method,
                              max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, config=config, pool=pool,
                              stopping=stopping, pad_token_id=pad_token_id, do_sample=do_sample,
                              temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                              streamer=streamer, generator=generator, costs=costs, engine=engine, solo=generate)
    config = OuroborosConfig() if config is None else config
    prompt = validate(target, input_ids, draft, method, max_new_tokens, config, pool)
    verify = make_verifier(do_sample, temperature, top_k, top_p, min_p, seed, generator)
    eos = set(eos_token_ids(target, eos_token_id))
    stats = GenerationStats()
    start = time.perf_counter()
    spec = get_method(method)
    with torch.inference_mode():
        if spec.needs_costs and costs is None:
            costs, stats.measure_seconds = engine.timed_costs()
        runner = engine.runner("target")
        pool = PhrasePool(config.level, config.pool_size) if pool is None else pool
        draft_runner = engine.runner("draft") if spec.takes_draft and draft is not None else None
        proposer = spec.build(Setup(list(prompt), config, pool, draft_runner, max_new_tokens, costs))
        if streamer is not None:
            streamer.put(input_ids.detach().reshape(1, -1).cpu())
        context = Context(list(prompt), max_new_tokens)
        finish = "length"
        while context.remaining > 0:
            proposal = proposer.propose(context)
            result = decode_step(runner, context.tokens, proposal.tree, verify)
            proposer.learn(context, proposal, result)
            emitted, ended = emit(context, result, eos)
            stats.accept_lengths.append(len(emitted))
            if streamer is not None:
                streamer.put(torch.tensor(emitted))
            if ended or (stopping is not None and stopping(context.tokens[len(prompt):])):
                finish = "stop"
                break
        if streamer is not None:
            streamer.end()
    stats.wall_time = time.perf_counter() - start
    draft_log = proposer.draft_runner.log if proposer.draft_runner is not None else []
    stats.target_forwards = runner.forwards
    stats.draft_forwards = len(draft_log)
    stats.forward_log = sorted([*runner.log, *draft_log], key=lambda record: record.started)
    stats.compile_seconds = runner.compile_seconds + (
        proposer.draft_runner.compile_seconds if proposer.draft_runner is not None else 0.0)
    if costs is not None:
        engine.check_costs(costs, stats.forward_log)
    stats.events = dict(proposer.events)
    if isinstance(proposer, Planned):
        stats.plan = proposer.plan.line()
        stats.plan_start = proposer.plan.start.value
    stats.new_tokens = len(context.tokens) - len(prompt)
    sequences = torch.tensor([context.tokens], dtype=torch.long, device=input_ids.device)
    return GenerationOutput(sequences, stats, finish)


def _engine(target, draft, fast: bool | None, engine: Engine | None, draft_vocab: int | None) -> Engine:
    """The given engine, checked against the call's models, or the one cached for them."""
    if engine is None:
        return engine_for(target, draft, fast, draft_vocab=draft_vocab)
    if engine.target is not target or engine.draft is not draft:
        raise InvalidArgumentError("engine was built for other models than the target and draft given")
    return engine
