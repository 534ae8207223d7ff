"""The registry of decoding methods: one entry per method, read by `generate`, the bench, the CLI
and the server. Adding a method is adding one `Method` with `register`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .config import OuroborosConfig
from .costs import CostTable
from .errors import InvalidArgumentError
from .pool import PhrasePool
from .proposers import (
    DraftModelProposer,
    LookaheadProposer,
    NullProposer,
    PromptLookupProposer,
    Proposer,
)
from .runner import Runner


@dataclass(frozen=True)
class Setup:
    """What a method's builder gets for one generation."""

    prompt: list[int]
    config: OuroborosConfig
    pool: PhrasePool
    """The phrase pool: the caller's (warm) or a fresh one (cold)."""
    draft_runner: Runner | None
    """The draft model's runner when the method uses a draft model and one was given, else None."""
    max_new_tokens: int = 0
    costs: CostTable | None = None
    """Forward costs of this machine, measured on the runners in use: the caller's, or the engine's
    for a method that `needs_costs`."""


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[Setup], Proposer]
    needs_draft: bool = False
    uses_draft: bool | None = None
    """Uses a draft model when one is given (None: only when it needs one)."""
    summary: str = ""
    needs_costs: bool = False
    """Plans from this machine's cost table: `generate` gets it from the engine before building."""

    @property
    def takes_draft(self) -> bool:
        return self.needs_draft if self.uses_draft is None else self.uses_draft


REGISTRY: dict[str, Method] = {}
"""Every known method by name, in registration order."""


class _Names(Sequence):
    """A live, ordered view of the registered names (so `METHODS` follows later registrations)."""

    def __getitem__(self, index):
        return list(REGISTRY)[index]

    def __len__(self) -> int:
        return len(REGISTRY)

    def __contains__(self, name) -> bool:
        return name in REGISTRY

    def __repr__(self) -> str:
        return repr(tuple(REGISTRY))


METHODS: Sequence[str] = _Names()
"""The names of all methods, in registration order."""


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise InvalidArgumentError(f"a method named {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise InvalidArgumentError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def _speculative(setup: Setup) -> Proposer:
    return DraftModelProposer(setup.draft_runner, NullProposer(), setup.pool, setup.config.classic(), lengthen=False,
                              harvest=False, context_phrases=False)


def _ouroboros(setup: Setup) -> Proposer:
    config, pool = setup.config, setup.pool
    if config.context_phrases:
        pool.insert_ngrams(setup.prompt)
    drafter = LookaheadProposer(pool, config, seed=setup.prompt) if config.phrase_drafting else NullProposer()
    return DraftModelProposer(setup.draft_runner, drafter, pool, config, lengthen=config.lengthen,
                              harvest=config.harvest, context_phrases=config.context_phrases)


def _auto(setup: Setup) -> Proposer:
    from .planning import Arm, plan
    from .proposers.auto import AutoProposer

    draft = setup.draft_runner.model if setup.draft_runner is not None else None
    if setup.costs is None:
        raise InvalidArgumentError("method 'auto' plans from a cost table: give Setup.costs (generate reads it)")
    chosen = plan(setup.costs, len(setup.prompt), setup.max_new_tokens, acceptance=AUTO_ACCEPTANCE, base=setup.config,
                  has_draft=draft is not None)
    arms: dict[Arm, Proposer] = {Arm.VANILLA: NullProposer(),
                                 Arm.PROMPT_LOOKUP: PromptLookupProposer(chosen.lookup_gamma, setup.config.max_ngram)}
    if draft is not None:
        arms[Arm.OUROBOROS] = _ouroboros(replace(setup, config=chosen.config))
    return AutoProposer(arms, chosen, pool=setup.pool, context_phrases=chosen.config.context_phrases)


AUTO_ACCEPTANCE = 0.75
"""The draft's per-token acceptance assumed by auto's plan before decoding (it then observes)."""

register(Method("vanilla", lambda setup: NullProposer(), summary="one token per target forward"))
register(Method("speculative", _speculative, needs_draft=True, summary="the draft model's greedy chain"))
register(Method("lookahead", lambda setup: LookaheadProposer(setup.pool, setup.config.classic(), seed=setup.prompt),
                summary="Jacobi decoding on the target alone"))
register(Method("prompt_lookup", lambda setup: PromptLookupProposer(setup.config.gamma, setup.config.max_ngram),
                summary="n-grams of the context"))
register(Method("ouroboros", _ouroboros, needs_draft=True,
                summary="draft model with phrase drafting, branches and phrase harvesting"))
register(Method("auto", _auto, uses_draft=True, needs_costs=True,
                summary="picks and switches among the above per step from measured costs, plain decoding where "
                        "speculation does not pay"))
