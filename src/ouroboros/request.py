"""One generation request's parts shared by the solo and the batched loops: the argument checks,
the verification rule, how a step's tokens are emitted, and the stats."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from .acceptance import Sampler, StepResult, greedy_verify
from .config import OuroborosConfig
from .errors import InvalidArgumentError, InvalidTypeError
from .methods import get_method
from .model_facts import context_length, vocab_size
from .pool import PhrasePool
from .proposers import Context
from .runner import ForwardRecord, check_tree_attention

MIN_TEMPERATURE = 1e-6
"""Below this, logits / temperature can overflow float32; 0 (greedy) is the limit users mean."""

__all__ = ["MIN_TEMPERATURE", "GenerationStats", "emit", "make_verifier", "validate"]


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


def emit(context: Context, result: StepResult, eos: set[int]) -> tuple[list[int], bool]:
    """Add a step's emitted tokens to `context`, cut at its budget and after the first EOS; return
    them, and whether they end with an EOS."""
    emitted = result.emitted[:context.remaining]
    ends = [i for i, token in enumerate(emitted) if token in eos]
    if ends:
        emitted = emitted[:ends[0] + 1]
    context.tokens += emitted
    context.remaining -= len(emitted)
    return emitted, bool(ends)


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
        generator = seeded_generator(seed)
    return Sampler(temperature, top_k, top_p, min_p, generator).verify


def seeded_generator(seed: int | None) -> torch.Generator:
    """The CPU generator a sampler draws from: seeded with `seed`, or from the OS when None."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    return generator


def validate(target, input_ids, draft, method, max_new_tokens, config, pool) -> list[int]:
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
