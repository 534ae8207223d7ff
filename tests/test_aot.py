"""The CPU fast path's compiled forward kept on disk (AOTInductor): built once, loaded by later
processes without compiling, exact, and never reused for another model."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from test_exactness import VOCAB, prompt, reference
from tiny_models import perturbed, tiny_model

import ouroboros.aot as aot
from ouroboros import METHODS, generate
from ouroboros.aot import package_key


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny target and draft whose packages are built once into a fresh cache folder."""
    folder = tmp_path_factory.mktemp("compiled")
    old = os.environ.get(aot.CACHE_ENV)
    os.environ[aot.CACHE_ENV] = str(folder)
    target = tiny_model("llama", seed=21, vocab=VOCAB)
    draft = perturbed(target, scale=0.05)
    first = generate(target, prompt(0), draft=draft, method="ouroboros", max_new_tokens=24, eos_token_id=[],
                     fast=True)
    yield target, draft, folder, first
    if old is None:
        del os.environ[aot.CACHE_ENV]
    else:
        os.environ[aot.CACHE_ENV] = old


def test_the_first_use_builds_a_package_per_model(built):
    target, draft, folder, first = built
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in folder.iterdir() if (p / "model.so").is_file() and (p / "key.json").is_file())
    assert len([p for p in folder.iterdir() if (p / "model.so").is_file()]) == 2  # target and draft
    assert first.stats.compile_seconds > 0
    assert any(record.compiled for record in first.stats.forward_log)


def test_building_removes_packages_of_an_older_format_only(monkeypatch, tmp_path):
    monkeypatch.setenv(aot.CACHE_ENV, str(tmp_path))
    for name, format in (("old", "ouroboros-aot/1"), ("current", aot.FORMAT), ("foreign", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "key.json").write_text(json.dumps({"format": format}) if format else "not json")
    target = tiny_model("llama", seed=24, vocab=VOCAB)
    generate(target, prompt(1), method="vanilla", max_new_tokens=3, eos_token_id=[], fast=True)
    assert not (tmp_path / "old").exists() and (tmp_path / "current").exists() and (tmp_path / "foreign").exists()
    assert len(list(tmp_path.glob("*/model.so"))) == 1


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_exact_on_the_package(built, method):
    target, draft, _, _ = built
    for seed in range(2):
        ids = prompt(seed)
        out = generate(target, ids, draft=draft, method=method, max_new_tokens=30, eos_token_id=[], fast=True)
        assert torch.equal(out.sequences, reference(target, ids, 30)), (method, seed)
        assert out.stats.compile_seconds == 0


def test_once_built_the_models_own_forward_is_never_called(built):
    """With a package on disk the runner lays its cache out from it and runs every forward through
    it: the model's own weights (mapped lazily from its files) are never read."""
    target, draft = (copy.deepcopy(model) for model in built[:2])  # new objects: no cache pooled for them yet
    calls = []
    hooks = [model.register_forward_pre_hook(lambda *args: calls.append(1)) for model in (target, draft)]
    try:
        out = generate(target, prompt(2), draft=draft, method="ouroboros", max_new_tokens=20, eos_token_id=[],
                       fast=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(out.sequences, reference(target, prompt(2), 20))
    assert calls == []


def test_a_new_process_loads_it_without_compiling(built):
    _, _, folder, _ = built
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from tiny_models import tiny_model, perturbed
        from test_exactness import prompt, reference
        from ouroboros import generate
        target = tiny_model("llama", seed=21, vocab={VOCAB})
        draft = perturbed(target, scale=0.05)
        out = generate(target, prompt(3), draft=draft, method="ouroboros", max_new_tokens=30, eos_token_id=[],
                       fast=True)
        assert torch.equal(out.sequences, reference(target, prompt(3), 30))
        print("compile seconds", out.stats.compile_seconds)
    """)
    env = {**os.environ, aot.CACHE_ENV: str(folder), "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "loaded LlamaForCausalLM's forward" in done.stderr and "compiling" not in done.stderr, done.stderr
    assert float(done.stdout.split()[-1]) < 10  # loading, not building (which took seconds here)


def test_the_weights_are_read_in_place_from_the_packages_file(built, tmp_path):
    """The package holds no copy of the weights: they are views of `constants.bin`, and zeroing that
    file changes what the package computes."""
    target, _, folder, _ = built
    (original,) = [p for p in folder.iterdir() if (p / "key.json").is_file() and json.loads(
        (p / "key.json").read_text()) == package_key(target)]
    zeroed = tmp_path / "zeroed"
    shutil.copytree(original, zeroed)
    (zeroed / "constants.bin").write_bytes(bytes((zeroed / "constants.bin").stat().st_size))
    c = target.config
    shape = (1, c.num_key_value_heads, 64, c.hidden_size // c.num_attention_heads)
    outputs = []
    for package in (aot.AotForward(original), aot.AotForward(zeroed)):
        file = package._file
        used = package._runner.extract_constants_map(False).values()  # what the package computes with
        addresses = [torch.ops.mkldnn.data_ptr(t) if t.is_mkldnn else t.data_ptr() for t in used if t.numel()]
        assert any(t.is_mkldnn for t in used) and any(not t.is_mkldnn for t in used)
        assert all(file.data_ptr() <= a < file.data_ptr() + file.numel() for a in addresses)
        keys = [torch.zeros(shape) for _ in range(c.num_hidden_layers)]
        mask = torch.zeros(1, 1, 3, 64)
        mask[..., 3:] = float("-inf")
        outputs.append(package(torch.tensor([[5, 6, 7]]), mask, torch.arange(3)[None], 0, keys,
                               [k.clone() for k in keys], torch.arange(3)))
    assert outputs[0].abs().sum() > 0 and torch.count_nonzero(outputs[1]) == 0


def test_any_changed_weight_or_setting_is_another_package():
    model = tiny_model("llama", seed=22, vocab=VOCAB)
    key = package_key(model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1  # a middle tensor: the baked weights differ
    assert package_key(model)["weights"] != key["weights"]
    assert package_key(model.to(torch.bfloat16))["dtype"] == "torch.bfloat16"


def test_a_package_that_does_not_build_falls_back_to_compiling_in_process(monkeypatch, tmp_path):
    monkeypatch.setenv(aot.CACHE_ENV, str(tmp_path))

    def fails(*args, **kwargs):
        raise RuntimeError("the C++ compiler is missing")

    monkeypatch.setattr(aot, "_build", fails)
    target = tiny_model("llama", seed=23, vocab=VOCAB)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(target, prompt(1), method="vanilla", max_new_tokens=12, eos_token_id=[], fast=True)
    assert any("the C++ compiler is missing" in str(w.message) for w in caught)
    assert torch.equal(out.sequences, reference(target, prompt(1), 12))
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_the_default_path_stays_eager_where_building_could_run_out_of_memory(monkeypatch, tmp_path):
    """fast=None builds a missing package only with free memory for it; --fast (True) still builds."""
    from ouroboros.static_runner import compile_not_worth

    monkeypatch.setenv(aot.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    model = tiny_model("llama", seed=25, vocab=VOCAB).to(torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(aot, "available_memory", lambda: 4 * weights)
    with pytest.warns(UserWarning, match="LlamaForCausalLM runs eagerly: building its compiled package needs"):
        assert "GB of free memory" in compile_not_worth(model)
    monkeypatch.setattr(aot, "available_memory", lambda: 6 * weights)
    assert compile_not_worth(model) is None
    monkeypatch.setattr(aot, "available_memory", lambda: None)  # not Linux: nothing to go by
    assert compile_not_worth(model) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_query_attention_in_packages_is_the_same_attention(dtype):
    """Packages are traced with SDPA's own grouped-query support instead of transformers' copies of
    every key-value head: the same result, bit for bit, with a tree mask and rows of a batch; the
    switch is put back after the build."""
    g = torch.Generator().manual_seed(0)
    query = torch.randn(3, 12, 5, 64, generator=g).to(dtype)
    keys, values = (torch.randn(3, 2, 40, 64, generator=g).to(dtype) for _ in range(2))
    mask = torch.zeros(3, 1, 5, 40, dtype=dtype)
    mask[..., 30:] = torch.finfo(dtype).min
    mask[1, :, 2, 10:20] = torch.finfo(dtype).min
    sdpa = torch.nn.functional.scaled_dot_product_attention
    copied = sdpa(query, keys.repeat_interleave(6, 1), values.repeat_interleave(6, 1), attn_mask=mask)
    assert torch.equal(sdpa(query, keys, values, attn_mask=mask, enable_gqa=True), copied)
    before = os.environ.get(aot.GQA_ENV)
    with aot._grouped_query_attention():
        assert os.environ[aot.GQA_ENV] == "1"
    assert os.environ.get(aot.GQA_ENV) == before
