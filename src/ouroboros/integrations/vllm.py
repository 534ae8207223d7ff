"""Ouroboros's phrase drafting inside vLLM, as a `custom_class` proposer (vLLM 0.32+, experimental there).

    LLM(model=TARGET, speculative_config={"method": "custom_class", "num_speculative_tokens": 4,
        "model": "ouroboros.integrations.vllm.OuroborosProposer"})

vLLM builds the class with its `VllmConfig` and calls `propose` once per step with every running
request's row; it verifies the returned drafts as linear chains (vLLM has no tree verification, and
no draft model runs here: Jacobi drafting and phrase branches stay in this project's own engine).
Each row's draft comes from (a) the longest earlier match of the row's last 2-5 tokens in its own
context (prompt lookup, as vLLM's `ngram`), continued or replaced by (b) phrases of a pool shared by
every request and learned from every request's verified output, chained while they match. The number
of drafted tokens per row shrinks as more rows run (`DraftSettings.step_budget`), and with it the
evidence asked for rises (a longer match, a phrase learned twice).

What identifies a request: nothing. No state is kept per request or per row: each call reads a
row's whole context (`token_ids_cpu[i, :num_tokens_no_spec[i]]`, its prompt and verified output)
and how many of its last tokens were sampled this step (`len(sampled_token_ids[i])`), so rows that
vLLM reorders, finishes, preempts or adds between steps need nothing; a row with no sampled tokens
(vLLM skips speculation for it) gets no draft and teaches nothing. The pool is the only state: at
most `capacity` phrases per key token (so bounded by the vocabulary), loaded from and saved to
`$OUROBOROS_VLLM_POOL` (the pool file format of `PhrasePool.save`) when that is set.

Settings come from the environment, since vLLM passes only its own config:
`OUROBOROS_VLLM_POOL` (pool file), `OUROBOROS_VLLM_STEP_BUDGET` (draft tokens per step across rows).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..pool import PhrasePool
from ..proposers.prompt_lookup import suffix_matches

POOL_ENV = "OUROBOROS_VLLM_POOL"
BUDGET_ENV = "OUROBOROS_VLLM_STEP_BUDGET"
SAVE_EVERY = 512
"""Steps between two saves of the pool file (and once more at exit)."""


@dataclass(frozen=True)
class DraftSettings:
    k: int = 4
    """Most tokens drafted for one row (vLLM's num_speculative_tokens)."""
    step_budget: int = 8
    """Draft tokens per step across rows: each of n rows gets min(k, step_budget // n), at least 1."""
    min_match: int = 2
    max_match: int = 5
    """Own-context matches: the last min_match..max_match tokens, longest first (as vLLM's ngram)."""
    pool_match: int = 2
    """Context tokens (key token included) a pool phrase must match before it is drafted."""
    level: int = 6
    """Pool n-gram size: a key token and level - 1 tokens after it."""
    capacity: int = 8
    """Phrases kept per key token, newest last."""


class PhraseChainDrafter:
    """The proposer's logic, apart from vLLM: learn from verified tokens, draft a chain for a row."""

    def __init__(self, settings: DraftSettings, pool: PhrasePool | None = None):
        self.settings = settings
        self.pool = pool if pool is not None else PhrasePool(settings.level, settings.capacity)

    def per_row(self, rows: int) -> int:
        """Tokens to draft for each of `rows` rows this step: fewer as the batch grows."""
        return max(1, min(self.settings.k, self.settings.step_budget // max(rows, 1)))

    def learn(self, tokens: np.ndarray, new: int) -> None:
        """Learn every pool n-gram that ends in the `new` last tokens of `tokens` [n] (verified by the
        target this step: the pool learns output, and a prompt only where output follows it)."""
        n, level = len(tokens), self.pool.level
        if new > 0:
            self.pool.insert_ngrams(tokens[max(0, n - new - level + 1):].tolist())

    def draft(self, tokens: np.ndarray, room: int, strict: bool = False) -> list[int]:
        """Up to `room` tokens to follow `tokens` [n]: the own-context match, then pool phrases.
        `strict` (under load, when a wrong token costs every row's verification more): only matches
        one token longer than usual and phrases learned at least twice."""
        drafted = context_match(tokens, self.settings.min_match + strict, self.settings.max_match, room)
        tail = tokens[-self.pool.level:].tolist()
        while len(drafted) < room:
            phrase = self.pool_continuation(tail + drafted, min_seen=1 + strict)
            if not phrase:
                break
            drafted += phrase[:room - len(drafted)]
        return drafted

    def pool_continuation(self, tail: Sequence[int], min_seen: int = 1) -> list[int]:
        """What the pool says follows `tail`: among phrases learned `min_seen` times or more whose key
        and first tokens match the last m tokens of `tail` (m from level - 1 down to pool_match), the
        most often learned, newest on ties; the rest of that phrase."""
        for m in range(min(self.pool.level - 1, len(tail)), self.settings.pool_match - 1, -1):
            key, prefix = tail[-m], tuple(tail[len(tail) - m + 1:])
            matching = [p for p in self.pool.lookup(key, self.pool.capacity, min_seen) if p[:m - 1] == prefix]
            if matching:
                return list(max(matching, key=lambda p: self.pool.seen(key, p))[m - 1:])
        return []


def context_match(tokens: np.ndarray, shortest: int, longest: int, room: int) -> list[int]:
    """Up to `room` tokens that followed the latest earlier occurrence of the longest suffix of
    `tokens` [n] between `shortest` and `longest` tokens long (`prompt_lookup.suffix_matches`);
    [] if there is none."""
    matched, ends = suffix_matches(torch.from_numpy(np.ascontiguousarray(tokens)), longest)
    if matched < shortest:
        return []
    start = int(ends[-1])
    return tokens[start:start + room].tolist()


class OuroborosProposer:
    """vLLM's `custom_class` proposer: `propose` returns one draft (a list of token ids, maybe empty)
    per row of `sampled_token_ids`."""

    def __init__(self, vllm_config):
        spec = vllm_config.speculative_config
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        k = int(spec.num_speculative_tokens)
        budget = int(os.environ.get(BUDGET_ENV, 2 * k))
        self.pool_path = os.environ.get(POOL_ENV) or None
        pool = None
        if self.pool_path and os.path.exists(self.pool_path):
            pool, _ = PhrasePool.load(self.pool_path)
        level = pool.level if pool is not None else DraftSettings.level
        self.drafter = PhraseChainDrafter(DraftSettings(k=k, step_budget=budget, level=level), pool)
        self.steps = 0
        if self.pool_path:
            atexit.register(self.save)

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings=None) -> list[list[int]]:
        """`sampled_token_ids[i]`: the tokens row i got this step (empty: no speculation for it);
        `num_tokens_no_spec` [max_num_reqs]: each row's verified length; `token_ids_cpu`
        [max_num_reqs, max_model_len]: each row's tokens. Returns each row's draft."""
        active = [i for i, sampled in enumerate(sampled_token_ids) if len(sampled)]
        per_row = self.drafter.per_row(len(active))
        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        for i in active:
            n = int(num_tokens_no_spec[i])
            tokens = np.asarray(token_ids_cpu[i, :n])
            self.drafter.learn(tokens, len(sampled_token_ids[i]))
            room = min(per_row, self.max_model_len - n)
            if room > 0:
                drafts[i] = self.drafter.draft(tokens, room, strict=per_row < self.drafter.settings.k)
        self.steps += 1
        if self.pool_path and self.steps % SAVE_EVERY == 0:
            self.save()
        return drafts

    def load_model(self, *args, **kwargs) -> None:
        """Nothing to load: no draft model runs inside vLLM."""

    def save(self) -> None:
        """Write the pool to `$OUROBOROS_VLLM_POOL` (atomically), if that is set."""
        if self.pool_path:
            self.drafter.pool.save(self.pool_path, {"source": "ouroboros.integrations.vllm"})
