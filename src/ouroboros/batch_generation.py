"""Batched generation: several prompts at once, each row exactly its own solo `generate`.

Every row keeps its own proposer, context, budget, EOS and stop rule; one target forward per step
verifies every active row's tree (`BatchRunner`), and a finished row leaves the batch. The draft model
runs batched too: each row's proposer drafts on its view of one shared draft `BatchRunner`, and the
rows' draft forwards of a step are batched round by round (`DraftBatch`). Each step's draft is sized
to the batch's load (`batch_sizing`); `method="auto"` is refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch

from .batch_costs import batch_costs
from .batch_draft import DraftBatch
from .batch_runner import BatchRunner, make_batch_runner
from .batch_sizing import LoadSizer
from .config import OuroborosConfig
from .errors import InvalidArgumentError, InvalidTypeError
from .methods import Setup, get_method
from .model_facts import eos_token_ids
from .pool import PhrasePool
from .proposers import Context, Proposal, Proposer
from .request import GenerationStats, emit, make_verifier, validate
from .tree import DraftTree

__all__ = ["BatchGenerationOutput", "generate_batch", "is_batch"]


@dataclass
class BatchGenerationOutput:
    sequences: torch.LongTensor
    """[rows, length] as transformers' batched generate: each row its prompt as given (left padding
    included) then its new tokens, then `pad_token_id` up to the longest row."""
    stats: list[GenerationStats]
    """Per row: its steps, tokens, events, and the batched target and draft forwards it took part in
    (each batched forward counts once in every row it served; its forward-log record, shared by
    those rows, gives the whole batch's fed tokens and time)."""
    finish_reasons: list[str] = field(default_factory=list)
    """Per row: "stop" (EOS or the stopping callback) or "length" (max_new_tokens reached)."""


@dataclass
class _Row:
    index: int
    prompt: list[int]
    context: Context
    proposer: Proposer
    verify: Callable
    stats: GenerationStats = field(default_factory=GenerationStats)
    finish: str = "length"


def is_batch(input_ids, attention_mask=None) -> bool:
    """Whether `generate` got a batch: a list of prompts, input_ids with more than one row, or an
    attention_mask."""
    if attention_mask is not None:
        return True
    if isinstance(input_ids, torch.Tensor):
        return input_ids.dim() == 2 and input_ids.shape[0] > 1
    return isinstance(input_ids, (list, tuple)) and bool(input_ids) and all(
        isinstance(row, (list, tuple, torch.Tensor)) for row in input_ids)


def generate_batch(
    target,
    prompts,
    *,
    attention_mask: torch.Tensor | None = None,
    draft=None,
    method: str = "ouroboros",
    max_new_tokens: int = 128,
    eos_token_id: int | Sequence[int] | None = None,
    config: OuroborosConfig | None = None,
    pool: PhrasePool | None = None,
    stopping: Callable[[list[int]], bool] | None = None,
    pad_token_id: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = None,
    streamer=None,
    generator: torch.Generator | None = None,
    costs=None,
    fast: bool | None = None,
    size_by_load: bool = True,
    solo: Callable | None = None,
) -> BatchGenerationOutput:
    """Generate for every row of `prompts`; row i of the output is exactly `generate` on row i alone.

    `prompts` is a list of token-id lists (or 1-D tensors) of any lengths, or input_ids [rows, length]
    with `attention_mask` [rows, length] marking left padding with zeros (as transformers' batched
    generate takes them). `pool=None` gives every row its own fresh phrase pool (cold, as a solo call);
    a given pool is shared by all rows and learns from all of them, which changes speed, never a
    row's tokens. Sampling: row i draws from its own generator seeded with `seed + i` (so a row's
    output equals `generate(row, seed=seed + i)`), or an unseeded one when `seed` is None.
    `stopping(new_tokens)` is called per row. `pad_token_id` fills rows after their end (default:
    the target's generation_config pad id, else its first EOS id). `streamer` and `generator` are
    single-stream options and are refused here.

    `fast` picks the runners as in `generate` (the models' compiled packages where they pay). With
    `size_by_load` each step's draft is sized to the batch (`batch_sizing`): down to plain batched
    decoding where speculating costs the batch more than it gains, judged on this machine's batched
    forward costs (`batch_costs`, measured on first use); `costs` is for a batch of one row, which
    runs on `solo`, the single-stream `generate` (its own sizing, and every method), so that one row
    is as fast as a solo call.
    """
    config = OuroborosConfig() if config is None else config
    spec = get_method(method)
    given, prompt_lists = _rows(prompts, attention_mask)
    if len(prompt_lists) == 1 and solo is not None and streamer is None and generator is None:
        out = solo(target, torch.tensor([prompt_lists[0]]), draft=draft, method=method, max_new_tokens=max_new_tokens,
                   eos_token_id=eos_token_id, config=config, pool=pool, stopping=stopping, do_sample=do_sample,
                   temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, costs=costs, fast=fast)
        pad = _pad_id(target, pad_token_id, eos_token_ids(target, eos_token_id))
        new = out.sequences[0, len(prompt_lists[0]):].tolist()
        return BatchGenerationOutput(_sequences(given, prompt_lists, [new], pad), [out.stats], [out.finish_reason])
    _refuse_single_stream_options(spec.name, streamer, generator)
    for prompt in prompt_lists:
        validate(target, torch.tensor([prompt]), draft, method, max_new_tokens, config, pool)
    eos_ids = eos_token_ids(target, eos_token_id)
    eos = set(eos_ids)
    pad = _pad_id(target, pad_token_id, eos_ids)
    start = time.perf_counter()
    drafting = spec.takes_draft and draft is not None
    sizer = None
    with torch.inference_mode():
        if size_by_load and spec.name != "vanilla" and len(prompt_lists) > 1:
            sizer = LoadSizer(batch_costs(target, fast=fast), batch_costs(draft, fast=fast) if drafting else None,
                              config.verify_budget - 1)
        runner = make_batch_runner(target, range(len(prompt_lists)), fast=fast)
        drafts = DraftBatch(make_batch_runner(draft, range(len(prompt_lists)), fast=fast, role="draft")) \
            if drafting else None
    rows: dict[int, _Row] = {}
    with torch.inference_mode(), drafts if drafts is not None else nullcontext():
        for i, prompt in enumerate(prompt_lists):
            row_pool = PhrasePool(config.level, config.pool_size) if pool is None else pool
            draft_runner = drafts.view(i) if drafts is not None else None
            proposer = spec.build(Setup(list(prompt), config, row_pool, draft_runner, target, max_new_tokens, None,
                                        fast))
            verify = make_verifier(do_sample, temperature, top_k, top_p, min_p,
                                   None if seed is None else seed + i, None)
            rows[i] = _Row(i, prompt, Context(list(prompt), max_new_tokens), proposer, verify)
        active = list(rows)
        while active:
            proposals = _propose([rows[i] for i in active], drafts, sizer)
            logits = runner.forward({i: (runner.rewind(i, rows[i].context.tokens), proposals[i].tree)
                                     for i in active})
            finished = [i for i in active if _step(rows[i], proposals[i], logits[i], runner, eos, stopping, start,
                                                   sizer, proposals is not _PLAIN)]
            if finished:
                runner.drop(finished)
                if drafts is not None:
                    drafts.drop(finished)
                active = [i for i in active if i not in finished]
    compiled = runner.compile_seconds + (drafts.runner.compile_seconds if drafts is not None else 0.0)
    for row in rows.values():
        steps = row.stats.target_forwards = len(row.stats.accept_lengths)
        draft_log = row.proposer.draft_runner.log if row.proposer.draft_runner is not None else []
        row.stats.draft_forwards = len(draft_log)
        row.stats.forward_log = sorted(runner.log[:steps] + draft_log, key=lambda record: record.started)
        row.stats.events = dict(row.proposer.events)
        row.stats.new_tokens = len(row.context.tokens) - len(row.prompt)
        row.stats.compile_seconds = compiled
    new = [row.context.tokens[len(row.prompt):] for row in rows.values()]
    return BatchGenerationOutput(_sequences(given, prompt_lists, new, pad), [row.stats for row in rows.values()],
                                 [row.finish for row in rows.values()])


class _Plain(dict):
    """A step's proposals when the load sizing chose plain decoding: no proposer ran."""

    def __missing__(self, row: int) -> Proposal:
        return Proposal(DraftTree(max_depth=0))


_PLAIN = _Plain()


def _propose(rows: list[_Row], drafts: DraftBatch | None, sizer: LoadSizer | None) -> dict[int, Proposal]:
    """Each row's proposal for this step: its proposer's, within the node budget the load allows
    (`_PLAIN`, plain decoding, when that budget is 0)."""
    budget = sizer.budget([row.index for row in rows]) if sizer is not None else None
    if budget == 0:
        return _PLAIN
    calls = {}
    for row in rows:
        context = row.context if budget is None else Context(row.context.tokens, min(row.context.remaining, budget + 1),
                                                              nodes=budget)
        calls[row.index] = partial(row.proposer.propose, context)
    if drafts is None:
        return {i: call() for i, call in calls.items()}
    before = drafts.runner.forwards
    proposals = drafts.propose(calls)
    if sizer is not None:
        sizer.observe_rounds(drafts.runner.forwards - before, max(p.tree.size for p in proposals.values()))
    return proposals


def _step(row: _Row, proposal: Proposal, logits: torch.Tensor, runner: BatchRunner, eos: set[int], stopping,
          start: float, sizer: LoadSizer | None, learn: bool) -> bool:
    """Verify one row's tree on its logits [1 + tree.total, vocab], keep, learn (unless the proposal
    is not the proposer's: a step sized to plain decoding) and emit, as one step of `generate`; True
    when the row is finished."""
    result = row.verify(proposal.tree, logits)
    runner.keep(row.index, result.path)
    context = row.context
    depth = max(proposal.tree.depths, default=0)
    if sizer is not None:
        sizer.row(row.index).observe(depth, len(result.path))
    if learn:
        row.proposer.learn(context, proposal, result)
    emitted, ended = emit(context, result, eos)
    row.stats.accept_lengths.append(len(emitted))
    if ended or (stopping is not None and stopping(context.tokens[len(row.prompt):])):
        row.finish = "stop"
    done = row.finish == "stop" or context.remaining <= 0
    if done:
        row.stats.wall_time = time.perf_counter() - start
    return done


def _refuse_single_stream_options(method: str, streamer, generator) -> None:
    if method == "auto":
        raise InvalidArgumentError("method 'auto' does not batch yet: pick a method, or call generate once per row")
    for name, value in (("streamer", streamer), ("generator", generator)):
        if value is not None:
            raise InvalidArgumentError(f"{name} is a single-stream option: batched generation does not take it"
                                       + (" (give seed: row i samples with seed + i)" if name == "generator" else ""))


def _rows(prompts, attention_mask) -> tuple[torch.Tensor | None, list[list[int]]]:
    """(input_ids as given when a tensor, else None; each row's prompt without its padding)."""
    if not isinstance(prompts, torch.Tensor):
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise InvalidTypeError("prompts must be a non-empty list of token-id lists or input_ids [rows, length], "
                                   f"got {type(prompts).__name__}")
        if attention_mask is not None:
            raise InvalidArgumentError("attention_mask goes with input_ids [rows, length], not with a list of prompts")
        rows = []
        for i, row in enumerate(prompts):
            row = row.reshape(-1).tolist() if isinstance(row, torch.Tensor) else list(row)
            if not row:
                raise InvalidArgumentError(f"prompt {i} is empty: give at least one token per row")
            if not all(isinstance(token, int) and not isinstance(token, bool) for token in row):
                raise InvalidTypeError(f"prompt {i} must hold integer token ids")
            rows.append(row)
        return None, rows
    if prompts.dim() != 2:
        raise InvalidArgumentError(f"batched input_ids must have shape [rows, length], got {tuple(prompts.shape)}")
    if prompts.dtype.is_floating_point or prompts.dtype.is_complex or prompts.dtype == torch.bool:
        raise InvalidTypeError(f"input_ids must hold integer token ids, got dtype {prompts.dtype}")
    if attention_mask is None:
        attention_mask = torch.ones_like(prompts)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != prompts.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise InvalidArgumentError(f"attention_mask must be a tensor of input_ids' shape {tuple(prompts.shape)}, "
                                   f"got {shape}")
    mask = attention_mask.cpu().long()  # [rows, length]
    if ((mask != 0) & (mask != 1)).any():
        raise InvalidArgumentError("attention_mask must hold only 0 (padding) and 1 (token)")
    for i in range(mask.shape[0]):
        if not mask[i].any():
            raise InvalidArgumentError(f"row {i} of attention_mask is all padding: every row needs a token")
    if (mask[:, 1:] < mask[:, :-1]).any():
        row = int((mask[:, 1:] < mask[:, :-1]).any(dim=1).nonzero()[0])
        raise InvalidArgumentError(f"attention_mask row {row} has padding after a token: only left padding is "
                                   "supported (zeros before the tokens, as transformers pads for generation)")
    ids = prompts.cpu()
    return prompts, [ids[i][mask[i].bool()].tolist() for i in range(ids.shape[0])]


def _pad_id(target, pad_token_id: int | None, eos: list[int]) -> int | None:
    """The id that fills rows after their end: given, the target's pad id, or its first EOS id."""
    if pad_token_id is not None:
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise InvalidArgumentError(f"pad_token_id must be an int >= 0, got {pad_token_id!r}")
        return pad_token_id
    config_pad = getattr(getattr(target, "generation_config", None), "pad_token_id", None)
    if isinstance(config_pad, int):
        return config_pad
    return eos[0] if eos else None


def _sequences(given: torch.Tensor | None, prompts: list[list[int]], new: list[list[int]],
               pad: int | None) -> torch.Tensor:
    """[rows, longest] output: each row's prompt (as given) and new tokens, `pad` after its end."""
    heads = given.tolist() if given is not None else prompts
    rows = [head + tokens for head, tokens in zip(heads, new)]
    width = max(len(row) for row in rows)
    if pad is None and any(len(row) < width for row in rows):
        raise InvalidArgumentError("rows ended at different lengths and no pad id is known: give pad_token_id")
    out = torch.tensor([row + [pad] * (width - len(row)) for row in rows], dtype=torch.long)
    return out.to(given.device) if given is not None else out
