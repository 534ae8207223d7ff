"""`loading.stored_as`: the built-in pair's float32 files copied once to the dtype it is loaded in."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from ouroboros import loading
from ouroboros.loading import stored_as


@pytest.fixture
def fp32_dir(tmp_path):
    path = tmp_path / "model"
    tiny_model("qwen2").save_pretrained(path)
    return path


def test_copy_holds_the_same_weights_cast_once(fp32_dir):
    copy = stored_as(fp32_dir, torch.bfloat16)
    assert copy == fp32_dir.with_name("model-bfloat16")
    reference = AutoModelForCausalLM.from_pretrained(fp32_dir, dtype=torch.bfloat16)
    loaded = AutoModelForCausalLM.from_pretrained(copy, dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(reference.state_dict().items(), loaded.state_dict().items()):
        assert b.dtype == torch.bfloat16 and torch.equal(a, b), name
    stamp = [(p.name, p.stat().st_mtime_ns) for p in sorted(copy.iterdir())]
    assert stored_as(fp32_dir, torch.bfloat16) == copy
    assert [(p.name, p.stat().st_mtime_ns) for p in sorted(copy.iterdir())] == stamp  # not written again


def test_a_folder_already_in_the_dtype_is_used_as_it_is(fp32_dir):
    assert stored_as(fp32_dir, torch.float32) == fp32_dir
    assert not fp32_dir.with_name("model-float32").exists()


def test_a_source_converted_again_is_copied_again(fp32_dir):
    copy = stored_as(fp32_dir, torch.bfloat16)
    tiny_model("qwen2", seed=5).save_pretrained(fp32_dir)
    os.utime(fp32_dir / "model.safetensors", ns=(1, 1))  # a different mtime whatever the clock
    stored_as(fp32_dir, torch.bfloat16)
    fresh = AutoModelForCausalLM.from_pretrained(copy, dtype=torch.bfloat16).state_dict()
    expected = tiny_model("qwen2", seed=5).to(torch.bfloat16).state_dict()
    assert all(torch.equal(fresh[name], expected[name]) for name in expected)


def test_an_interrupted_copy_leaves_nothing_to_load(fp32_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(KeyboardInterrupt):
        stored_as(fp32_dir, torch.bfloat16)
    assert sorted(p.name for p in fp32_dir.parent.iterdir()) == ["model"]
    monkeypatch.undo()
    assert stored_as(fp32_dir, torch.bfloat16).exists()
    assert loading.COPY_SOURCE in {p.name for p in fp32_dir.with_name("model-bfloat16").iterdir()}
