"""Ouroboros's drafting inside other engines (optional: each needs that engine installed)."""
