"""The contestants of `ouroboros bench`: HF's generate modes, every engine method and its variants
(warm pool, eager, ablation, one-at-a-time partners of batched runs), the vLLM and llama.cpp peers,
and which of them a run uses."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from ..config import ADAPTIVE_SWITCHES
from ..errors import InvalidArgumentError
from ..methods import METHODS, get_method

ABLATION_SWITCHES = ("phrase_drafting", "lengthen", "harvest", "context_phrases") + ADAPTIVE_SWITCHES
BASELINE = "hf_vanilla"


@dataclass(frozen=True)
class Method:
    """One contestant: an HF generate mode (`hf`) or an engine method (`engine`)."""

    name: str
    hf: str | None = None
    """"greedy", "assisted" or "prompt_lookup"."""
    engine: str | None = None
    warm: bool = False
    """One PhrasePool across the whole run instead of a fresh one per prompt."""
    disable: tuple[str, ...] = ()
    """OuroborosConfig switches turned off (ablation)."""
    fast: bool | None = None
    """Overrides the run's runner choice (e.g. vanilla_eager: plain decoding on the eager runner)."""
    peer: str | None = None
    """Another engine, run in its own process (`vllm_peer`, `llama_peer`): one of `PEERS`."""
    sequential: bool = False
    """With --batch N > 1: the group's prompts one after another (what a serial server delivers),
    beside the same method batched."""
    unsized: bool = False
    """With --batch N > 1: every row drafts its single-stream budget (no load sizing, the ablation)."""
    draft_vocab: int | None = None
    """Overrides the run's --draft-vocab (0: the draft's full output layer, the ablation)."""

    @property
    def batches(self) -> bool:
        """Whether --batch N runs this contestant on N prompts in one call: HF greedy (left padded),
        the vLLM peers, and every engine method (not llama.cpp: its binding decodes one stream)."""
        if self.sequential:
            return False
        return self.hf == "greedy" or self.peer in VLLM_PEERS or self.engine is not None

    @property
    def needs_draft(self) -> bool:
        """Whether this contestant runs the draft model (so a bench without --draft cannot run it)."""
        return (self.hf == "assisted" or self.peer == "vllm_draft"
                or (self.engine is not None and get_method(self.engine).needs_draft))

    @property
    def compared(self) -> bool:
        """Whether its greedy text is compared token by token with hf_vanilla's: every contestant that
        runs the same numeric model, so not llama.cpp (its GGUF's quantized weights)."""
        return self.peer not in LLAMA_PEERS

    @property
    def foreign(self) -> bool:
        """Another implementation (HF or a peer engine): its accepted lengths are not known."""
        return bool(self.hf or self.peer)


def engine_methods() -> list[str]:
    """This engine's methods: every entry of the method registry."""
    return list(METHODS)


def contestants() -> dict[str, Method]:
    """HF's generate modes, every registered engine method, the warm-pool and ablation variants."""
    table = [Method("hf_vanilla", hf="greedy"), Method("hf_assisted", hf="assisted"),
             Method("hf_prompt_lookup", hf="prompt_lookup")]
    table += [Method(name, engine=name) for name in engine_methods()]
    table += [Method("ouroboros_warm", engine="ouroboros", warm=True)]
    table += [Method(f"{name}_eager", engine=name, fast=False) for name in ("vanilla", "ouroboros", "auto")]
    table += [Method(f"ouroboros_no_{switch}", engine="ouroboros", disable=(switch,)) for switch in ABLATION_SWITCHES]
    table += [Method("ouroboros_classic", engine="ouroboros", disable=ADAPTIVE_SWITCHES)]
    table += [Method("ouroboros_unsized", engine="ouroboros", unsized=True)]
    table += [Method("ouroboros_full_vocab", engine="ouroboros", draft_vocab=0)]
    table += [Method(name, peer=name) for name in PEERS]
    table += [Method(f"{base.name}_sequential", hf=base.hf, engine=base.engine, sequential=True)
              for base in table if base.name in SEQUENTIAL_METHODS]
    return {method.name: method for method in table}


DEFAULT_METHODS = ("hf_vanilla", "hf_assisted", "hf_prompt_lookup", "speculative", "lookahead", "prompt_lookup",
                   "ouroboros", "ouroboros_warm", "auto")
SEQUENTIAL_METHODS = ("hf_vanilla", "vanilla", "ouroboros", "auto")
"""Those with a `<name>_sequential` contestant: with --batch N > 1, the group run one prompt at a time."""
SEQUENTIAL_PARTNERS = ("vanilla", "ouroboros", "auto")
"""With --batch N > 1 these bring their sequential contestant along, for the batched/sequential ratio."""
VLLM_PEERS = ("vllm", "vllm_draft", "vllm_ngram", "vllm_ouroboros")
"""vLLM plain, with the draft model, with its n-gram proposer and with this project's phrase
proposer (`ouroboros.integrations.vllm`), when a Python with vLLM is available (`vllm_peer`)."""
LLAMA_PEERS = ("llama_cpp", "llama_cpp_lookup", "llama_cpp_draft")
"""llama.cpp plain, with its prompt lookup and with the draft model, when --llama-python is given
(`llama_peer`)."""
PEERS = VLLM_PEERS + LLAMA_PEERS
ABLATION_METHODS = ("hf_vanilla", "ouroboros") + tuple(f"ouroboros_no_{s}" for s in ABLATION_SWITCHES) + (
    "ouroboros_classic", "ouroboros_full_vocab")
"""The ablation: every switch off in turn, and `ouroboros_classic` with all the adaptive ones
(issue 11's) off at once, i.e. the method as it was before them."""


def resolve_methods(args: argparse.Namespace, peers_available: bool = False,
                    llama_available: bool = False) -> list[Method]:
    """The methods to run, the hf_vanilla baseline always first; the default list includes the vLLM
    peers when `peers_available` and the llama.cpp ones when `llama_available`. With --batch N > 1,
    those that cannot batch are left out (with a note) and vanilla and ouroboros bring their
    sequential contestants."""
    table = contestants()
    if args.ablation and args.methods:
        raise InvalidArgumentError("give --methods or --ablation, not both")
    if args.ablation:
        names = list(ABLATION_METHODS)
    elif args.methods:
        names = [name.strip() for name in args.methods.split(",") if name.strip()]
        unknown = [name for name in names if name not in table]
        if unknown:
            raise InvalidArgumentError(f"unknown method {', '.join(map(repr, unknown))}; "
                                       f"choose from {', '.join(table)}")
    else:
        names = (list(DEFAULT_METHODS) + (list(VLLM_PEERS) if peers_available else [])
                 + (list(LLAMA_PEERS) if llama_available else []))
    names = [BASELINE] + [name for name in dict.fromkeys(names) if name != BASELINE]
    if getattr(args, "batch", 1) > 1:
        skipped = [name for name in names if not (table[name].batches or table[name].sequential)]
        if skipped:
            print(f"ouroboros bench: --batch {args.batch}: skipping {', '.join(skipped)}, which cannot batch",
                  file=sys.stderr)
        names = [name for name in names if name not in skipped]
        names = list(dict.fromkeys(partner for name in names for partner in
                                   ([name, f"{name}_sequential"] if name in SEQUENTIAL_PARTNERS else [name])))
    return [table[name] for name in names]
