"""Test-wide settings: tiny models run fastest on one thread (and do not fight over the 2 cores);
measured cost tables (method="auto") go to a temporary directory, not the user's cache."""

import os
import tempfile

import torch

torch.set_num_threads(1)
os.environ["OUROBOROS_COST_CACHE"] = tempfile.mkdtemp(prefix="ouroboros-test-costs-")
