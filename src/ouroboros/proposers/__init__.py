"""Drafting strategies behind one contract (`base.Proposer`): one module per strategy."""

from .base import Context, NullProposer, Planned, Proposal, Proposer
from .draft_model import DraftModelProposer
from .lookahead import LookaheadProposer
from .prompt_lookup import PromptLookupProposer

__all__ = ["Context", "DraftModelProposer", "LookaheadProposer", "NullProposer", "Planned", "PromptLookupProposer",
           "Proposal", "Proposer"]
