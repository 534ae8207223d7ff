"""Test-wide settings: tiny models run fastest on one thread (and do not fight over the 2 cores)."""

import torch

torch.set_num_threads(1)
