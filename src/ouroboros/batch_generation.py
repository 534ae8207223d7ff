"""Batched generation: several prompts at once, each row exactly its own solo `generate`.

The arguments are checked and the rows read (a list of prompts, or left-padded input_ids), every
row is added to one `BatchSession` and stepped until all have ended, and the rows come back in
transformers' batched shape. A batch of one row runs the single-stream loop instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .batch_session import BatchSession
from .config import OuroborosConfig
from .engine import Engine
from .errors import InvalidArgumentError, InvalidTypeError
from .methods import get_method
from .model_facts import eos_token_ids
from .pool import PhrasePool
from .request import GenerationStats, make_verifier, validate

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
    engine: Engine | None = None,
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

    `fast` (or `engine`) picks the runners as in `generate` (the models' compiled packages where they
    pay). With
    `size_by_load` each step's draft is sized to the batch (`batch_sizing`): down to plain batched
    decoding where speculating costs the batch more than it gains, judged on this machine's batched
    forward costs (`batch_costs`, measured on first use); `costs` is for a batch of one row, which
    runs on `solo`, the single-stream `generate` (its own sizing, and every method), so that one row
    is as fast as a solo call.
    """
    config = OuroborosConfig() if config is None else config
    get_method(method)
    given, prompt_lists = _rows(prompts, attention_mask)
    if len(prompt_lists) == 1 and solo is not None and streamer is None and generator is None:
        out = solo(target, torch.tensor([prompt_lists[0]]), draft=draft, method=method, max_new_tokens=max_new_tokens,
                   eos_token_id=eos_token_id, config=config, pool=pool, stopping=stopping, do_sample=do_sample,
                   temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, costs=costs, fast=fast,
                   engine=engine)
        pad = _pad_id(target, pad_token_id, eos_token_ids(target, eos_token_id))
        new = out.sequences[0, len(prompt_lists[0]):].tolist()
        return BatchGenerationOutput(_sequences(given, prompt_lists, [new], pad), [out.stats], [out.finish_reason])
    _refuse_single_stream_options(streamer, generator)
    for prompt in prompt_lists:  # every row checked before anything is built or measured
        validate(target, torch.tensor([prompt]), draft, method, max_new_tokens, config, pool)
    eos_ids = eos_token_ids(target, eos_token_id)
    pad = _pad_id(target, pad_token_id, eos_ids)
    with BatchSession(target, draft, method=method, config=config, fast=fast, size_by_load=size_by_load,
                      engine=engine) as session:
        for i, prompt in enumerate(prompt_lists):
            session.add(prompt, max_new_tokens=max_new_tokens, eos=set(eos_ids), stopping=stopping, pool=pool,
                        verify=make_verifier(do_sample, temperature, top_k, top_p, min_p,
                                             None if seed is None else seed + i, None))
        while session.active:
            for index in session.step():
                if session.rows[index].error is not None:  # a caller of one call gets the error, as alone
                    raise session.rows[index].error
    rows = list(session.rows.values())
    return BatchGenerationOutput(_sequences(given, prompt_lists, [row.new_tokens for row in rows], pad),
                                 [row.stats for row in rows], [row.finish for row in rows])


def _refuse_single_stream_options(streamer, generator) -> None:
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
