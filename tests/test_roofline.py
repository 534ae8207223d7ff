"""The memory bound: which weights a one-token forward reads, the bandwidth yardstick, the report."""

import math

import pytest
import torch
from tiny_models import tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from ouroboros.roofline import MemoryBound, memory_bound, stream_bandwidth, weight_bytes


def test_an_untied_input_embedding_is_not_counted():
    model = tiny_model(vocab=97, hidden=32)
    every = sum(p.numel() * 4 for p in model.parameters())
    assert weight_bytes(model) == every - 97 * 32 * 4  # one embedding row is read, not the table


def test_a_tied_embedding_is_the_output_layer_and_counted_once():
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert weight_bytes(model) == sum(p.numel() * 4 for p in model.parameters())
    assert weight_bytes(model.to(torch.bfloat16)) == sum(p.numel() * 2 for p in model.parameters())


def test_stream_bandwidth_is_a_plausible_rate():
    matrices = [torch.ones(1024, 512), torch.ones(512, 1024), torch.ones(2048, 512)]
    rate = stream_bandwidth(matrices, repeats=2)
    assert math.isfinite(rate) and 1e8 < rate < 1e13  # between 0.1 GB/s and 10 TB/s


def test_the_line_states_the_bound_and_how_close_a_forward_comes():
    bound = MemoryBound(weight_bytes=3_000_000_000, bandwidth=20e9, one_token_seconds=0.160)
    assert bound.bound_seconds == pytest.approx(0.150)
    line = bound.line()
    assert "3.00 GB" in line and "20.0 GB/s" in line and "150 ms" in line and "6.7 tok/s" in line
    assert "measured 160 ms (94% of the bound's speed)" in line
    assert bound.to_dict() == {"weight_bytes": 3_000_000_000, "bandwidth_gb_s": 20.0,
                               "bound_tokens_per_second": 6.67, "one_token_ms": 160.0}
    assert "measured" not in MemoryBound(3_000_000_000, 20e9).line()


def test_memory_bound_of_a_model():
    model = tiny_model()
    bound = memory_bound(model, one_token_seconds=0.01)
    assert bound.weight_bytes == weight_bytes(model) and bound.bandwidth > 0
