"""Test-wide settings: tiny models run fastest on one thread (and do not fight over the 2 cores);
measured cost tables (method="auto") and compiled packages (the CPU fast path) go to temporary
directories, not the user's cache. And the
server tests' shared fixtures (their helpers import the serve extra, so only when asked for)."""

import os
import tempfile

import pytest
import torch

torch.set_num_threads(1)
os.environ["OUROBOROS_COST_CACHE"] = tempfile.mkdtemp(prefix="ouroboros-test-costs-")
os.environ["OUROBOROS_COMPILED_CACHE"] = tempfile.mkdtemp(prefix="ouroboros-test-compiled-")


@pytest.fixture(scope="module")
def server_pair():
    """The server tests' tiny target and draft (tests/server_helpers.py), one pair per module."""
    from server_helpers import make_pair

    return make_pair()


@pytest.fixture(scope="module")
def server_url(server_pair):
    """The base URL of a live server on `server_pair`, shared by one module's tests."""
    from server_helpers import MODEL, TOKENIZER, serving

    from ouroboros.server import create_app

    target, draft = server_pair
    with serving(create_app(target, draft, TOKENIZER, model_name=MODEL)) as url:
        yield url
