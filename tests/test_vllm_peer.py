"""The vLLM peer of the bench, with a stand-in `vllm` package (the real one is a 3.5 GB install that
CI does not make): the worker process, its protocol, its errors and the bench's vllm rows. The
stand-in decodes with transformers' greedy `generate` (assisted by the draft when given one), so
its outputs must match hf_vanilla token for token, as real vLLM's do."""

from __future__ import annotations

import json
import stat
import sys
import textwrap

import pytest
from tiny_models import save_tiny_pair

from ouroboros.bench.running import resolve_methods
from ouroboros.bench.vllm_peer import VllmError, VllmPeer, VllmSettings, started_peers, vllm_python
from ouroboros.cli import main
from ouroboros.errors import InvalidArgumentError

FAKE_VLLM = '''
import os
import torch
from transformers import AutoModelForCausalLM

__version__ = "0.0-stand-in"


class SamplingParams:
    def __init__(self, max_tokens, stop_token_ids, temperature, top_p, seed, detokenize):
        self.max_tokens, self.stop_token_ids, self.temperature = max_tokens, stop_token_ids, temperature


class _Out:
    def __init__(self, tokens):
        self.outputs = [type("Completion", (), {"token_ids": tokens})()]


class LLM:
    def __init__(self, model, dtype, max_model_len, enforce_eager, seed, speculative_config=None):
        if os.environ.get("STAND_IN_FAIL"):
            raise RuntimeError("stand-in engine refused to start")
        print("stand-in vLLM log line on stdout")  # must not reach the protocol
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        speculation = speculative_config or {}
        draft = speculation.get("model") if speculation.get("method") == "draft_model" else None
        self.draft = AutoModelForCausalLM.from_pretrained(draft, dtype=torch.float32).eval() if draft else None

    def generate(self, prompts, params, use_tqdm):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == int(os.environ.get("STAND_IN_DIE_AT", 0)):
            os._exit(9)  # as the kernel's OOM killer would
        ids = torch.tensor([prompts[0]["prompt_token_ids"]])
        extra = {"assistant_model": self.draft} if self.draft is not None else {}
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_tokens,
                                  do_sample=False, eos_token_id=params.stop_token_ids,
                                  pad_token_id=params.stop_token_ids[0], **extra)
        tokens = out[0, ids.shape[1]:].tolist()
        for i, token in enumerate(tokens):
            if token in params.stop_token_ids:
                tokens = tokens[:i + 1]
                break
        return [_Out(tokens)]
'''


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def stand_in_python(tmp_path_factory):
    """An executable that runs this Python with the stand-in `vllm` importable."""
    root = tmp_path_factory.mktemp("stand-in")
    (root / "vllm").mkdir()
    (root / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    (root / "vllm" / "inputs.py").write_text("def TokensPrompt(prompt_token_ids):\n"
                                             "    return {'prompt_token_ids': prompt_token_ids}\n")
    python = root / "python"
    python.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        PYTHONPATH={root} exec {sys.executable} "$@"
        """))
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return str(python)


def test_the_bench_runs_vllm_plain_and_with_draft_side_by_side(pair, stand_in_python, tmp_path, capsys):
    target, draft = pair
    out = tmp_path / "out"
    code = main(["bench", "--target", str(target), "--draft", str(draft), "--dtype", "float32", "--threads", "1",
                 "--max-new-tokens", "8", "--num-prompts", "2", "--methods", "ouroboros,vllm,vllm_draft",
                 "--vllm-python", stand_in_python, "--vllm-k", "3", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    (run,) = results["runs"]
    for name in ("vllm", "vllm_draft"):
        figures = run["overall"][name]
        assert figures["identical_share"] == 1.0 and figures["tokens_per_second"] > 0
        assert figures["target_forwards_per_token"] is None and figures["mean_accepted"] is None
        rows = [json.loads(line) for line in (out / "answers" / f"{name}-temp-0.jsonl").read_text().splitlines()]
        assert [row["choices"][0]["new_tokens"][0] for row in rows] == [8, 8]
    peers = results["settings"]["peers"]
    assert peers["vllm"]["version"] == "0.0-stand-in" and peers["vllm"]["num_speculative_tokens"] is None
    assert peers["vllm_draft"]["num_speculative_tokens"] == 3 and peers["vllm_draft"]["startup_seconds"] >= 0
    assert "stand-in vLLM log line" in (out / "vllm.log").read_text()
    table = capsys.readouterr().out
    assert "vllm_draft" in table


def test_a_worker_that_cannot_start_is_an_error_naming_its_log(pair, stand_in_python, tmp_path, monkeypatch):
    monkeypatch.setenv("STAND_IN_FAIL", "1")
    target, _ = pair
    settings = VllmSettings(stand_in_python, str(target), None, "float32", 256, 1)
    with pytest.raises(VllmError, match=r"stand-in engine refused to start.*vllm\.log"):
        VllmPeer(settings, tmp_path / "vllm.log", progress=False)


def test_the_bench_stops_cleanly_when_the_peer_fails(pair, stand_in_python, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STAND_IN_FAIL", "1")
    target, draft = pair
    out = tmp_path / "out"
    code = main(["bench", "--target", str(target), "--draft", str(draft), "--dtype", "float32", "--threads", "1",
                 "--max-new-tokens", "4", "--num-prompts", "1", "--methods", "vllm",
                 "--vllm-python", stand_in_python, "--out", str(out)])
    assert code != 0
    assert "vLLM worker failed" in capsys.readouterr().err
    assert not (out / "results.json").exists()


def test_a_peer_that_dies_mid_run_ends_it_with_the_completed_prompts_kept(pair, stand_in_python, tmp_path,
                                                                          monkeypatch, capsys):
    monkeypatch.setenv("STAND_IN_DIE_AT", "3")  # the warm-up, the first prompt, then death on the second
    target, draft = pair
    out = tmp_path / "out"
    code = main(["bench", "--target", str(target), "--draft", str(draft), "--dtype", "float32", "--threads", "1",
                 "--max-new-tokens", "4", "--num-prompts", "3", "--methods", "vllm",
                 "--vllm-python", stand_in_python, "--out", str(out)])
    assert code == 130
    assert "vLLM worker failed: worker exited with status" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    (run,) = results["runs"]
    assert run["completed_prompts"] == 1 and run["interrupted"] is True


def test_vllm_methods_without_vllm_say_what_to_give(tmp_path):
    with pytest.raises(InvalidArgumentError, match="--vllm-python"):
        with started_peers(["vllm"], None, "t", None, dtype="bfloat16", max_model_len=64, threads=1,
                           speculative_tokens=4, log_dir=tmp_path):
            pass
    with pytest.raises(InvalidArgumentError, match="not an executable"):
        vllm_python(str(tmp_path / "no-python"))


def test_the_default_methods_include_the_peers_only_when_vllm_is_there():
    import argparse

    args = argparse.Namespace(ablation=False, methods=None)
    assert {"vllm", "vllm_draft"} <= {m.name for m in resolve_methods(args, peers_available=True)}
    assert not {"vllm", "vllm_draft"} & {m.name for m in resolve_methods(args, peers_available=False)}
