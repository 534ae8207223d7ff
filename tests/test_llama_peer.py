"""The llama.cpp peer of the bench, with a stand-in `llama_cpp` package (CI does not build
llama-cpp-python): the worker's decoding loop and drafters, its process and protocol, its errors, the
GGUF files it is given, and the bench's llama rows, which are timed but never compared with
hf_vanilla (llama.cpp runs another numeric model). The stand-in's "model" is a GGUF file holding a
step: each next token is the last one moved on by that step, among the letters A-Z, so its text
never equals the tiny target's. One test runs the real binding when OUROBOROS_LLAMA_PYTHON is set."""

from __future__ import annotations

import argparse
import io
import json
import os
import stat
import sys
import textwrap

import pytest
from tiny_models import save_tiny_pair

from ouroboros.bench import llama_peer, llama_worker
from ouroboros.bench.llama_peer import LlamaError, LlamaPeer, LlamaSettings, gguf_files, llama_makers
from ouroboros.bench.peer_process import started
from ouroboros.bench.reporting import OTHER_MODEL_NOTE
from ouroboros.bench.running import resolve_methods
from ouroboros.cli import main
from ouroboros.errors import InvalidArgumentError

FAKE_LLAMA = '''
import os

__version__ = "0.0-stand-in"
CALLS = []  # (model step, event, detail): what every Llama of this process did


def next_token(context, step):
    return 65 + (context[-1] + step) % 26


class Llama:
    def __init__(self, model_path, n_ctx, n_threads, n_threads_batch, seed, verbose, draft_model=None,
                 n_batch=16, logits_all=False):
        if os.environ.get("STAND_IN_FAIL"):
            raise RuntimeError("stand-in llama.cpp refused to start")
        print(f"stand-in llama.cpp loads {model_path}")  # must not reach the protocol
        self.step = int(open(model_path).read())
        self.draft_model, self._n_ctx, self.threads, self.seed = draft_model, n_ctx, n_threads, seed
        self.cached = []
        # The binding's scores buffer: sized by the logits_all given (n_ctx rows, else n_batch: 512 there,
        # 16 here), though a draft model turns every token's logits on, each written at its position.
        self.logits_all, self.all_logits = logits_all, logits_all or draft_model is not None
        self.score_rows = n_ctx if logits_all else n_batch

    def _save_logits(self, context):
        if self.all_logits and len(context) > self.score_rows:
            raise ValueError(f"could not broadcast the logits of {len(context)} tokens into "
                             f"{self.score_rows} rows")

    def n_ctx(self):
        return self._n_ctx

    def set_seed(self, seed):
        self.seed = seed
        CALLS.append((self.step, "seed", seed))

    def reset(self):
        self.cached = []

    def generate(self, tokens, reset=True, **sampling):
        context = list(tokens)
        shared = 0
        while shared < min(len(self.cached), len(context)) and self.cached[shared] == context[shared]:
            shared += 1
        CALLS.append((self.step, "feed", len(context) - shared))
        CALLS.append((self.step, "sampling", sampling))
        print(f"feeds {len(context) - shared} tokens")
        while True:
            self._save_logits(context)
            token = next_token(context, self.step)
            self.cached = list(context)
            context.append(token)
            yield token
            if self.draft_model is not None:
                import numpy as np
                drafts = self.draft_model(np.array(context, dtype=np.intc))
                CALLS.append((self.step, "drafted", drafts.tolist()))
                print(f"drafted {len(drafts)}")
'''
FAKE_SPECULATIVE = '''
class LlamaDraftModel:
    pass


class LlamaPromptLookupDecoding(LlamaDraftModel):
    def __init__(self, max_ngram_size=2, num_pred_tokens=10):
        self.max_ngram_size, self.num_pred_tokens = max_ngram_size, num_pred_tokens

    def __call__(self, input_ids, **kwargs):
        return input_ids[:0]
'''


def expected(context: list[int], step: int, n: int) -> list[int]:
    """The stand-in's n greedy tokens after `context`."""
    context = list(context)
    for _ in range(n):
        context.append(65 + (context[-1] + step) % 26)
    return context[-n:]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """(root holding the stand-in `llama_cpp`, an executable that runs this Python with it importable,
    a target "GGUF" of step 1, a draft "GGUF" of step 2)."""
    root = tmp_path_factory.mktemp("stand-in")
    (root / "llama_cpp").mkdir()
    (root / "llama_cpp" / "__init__.py").write_text(FAKE_LLAMA)
    (root / "llama_cpp" / "llama_speculative.py").write_text(FAKE_SPECULATIVE)
    python = root / "python"
    python.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        PYTHONPATH={root} exec {sys.executable} "$@"
        """))
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    (root / "target.gguf").write_text("1")
    (root / "draft.gguf").write_text("2")
    return root, str(python), str(root / "target.gguf"), str(root / "draft.gguf")


@pytest.fixture
def fake_llama(stand_in, monkeypatch):
    """The stand-in `llama_cpp` imported in this process (fresh, its CALLS empty)."""
    root = stand_in[0]
    monkeypatch.syspath_prepend(str(root))
    for name in ("llama_cpp", "llama_cpp.llama_speculative"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import llama_cpp

    yield llama_cpp
    for name in ("llama_cpp", "llama_cpp.llama_speculative"):
        sys.modules.pop(name, None)


def settings(stand_in, mode=None, **more) -> dict:
    return {"target": stand_in[2], "draft": stand_in[3], "n_ctx": 64, "threads": 1, "mode": mode,
            "draft_tokens": 3, "lookup_ngram": 2, "lookup_tokens": 10, **more}


def serve(settings: dict, *requests: dict) -> list[dict]:
    replies = io.StringIO()
    llama_worker.serve(settings, [json.dumps(request) + "\n" for request in requests], replies)
    return [json.loads(line) for line in replies.getvalue().splitlines()]


def test_the_worker_decodes_each_prompt_from_an_empty_cache_up_to_eos_or_the_limit(stand_in, fake_llama):
    eos = expected([5], 1, 3)[-1]  # the third token after prompt [5] ends that prompt
    request = {"prompts": [[1, 2], [1, 2], [5]], "max_new_tokens": 6, "eos_ids": [eos], "temperature": 0.0,
               "seed": 7}
    ready, reply = serve(settings(stand_in), request)
    assert ready["ready"] is True and ready["version"] == "0.0-stand-in" and ready["startup_seconds"] >= 0
    assert reply["rows"] == [expected([1, 2], 1, 6), expected([1, 2], 1, 6), expected([5], 1, 3)]
    assert reply["seconds"] >= 0
    feeds = [detail for _, event, detail in fake_llama.CALLS if event == "feed"]
    assert feeds == [2, 2, 1]  # a repeated prompt pays its prefill again (no cached prefix)
    assert [detail for _, event, detail in fake_llama.CALLS if event == "seed"] == [7, 7, 7]
    sampling = [detail for _, event, detail in fake_llama.CALLS if event == "sampling"]
    assert all(s["temp"] == 0.0 and s["top_k"] == 1 and s["repeat_penalty"] == 1.0 for s in sampling)


def test_sampling_is_temperature_and_nucleus_only():
    assert llama_worker.sampling(0.0, 0.9) == llama_worker.GREEDY
    hot = llama_worker.sampling(0.7, 0.9)
    assert (hot["temp"], hot["top_p"], hot["top_k"], hot["min_p"], hot["typical_p"]) == (0.7, 0.9, 0, 0.0, 1.0)


def test_the_draft_mode_drafts_the_draft_ggufs_k_greedy_tokens(stand_in, fake_llama):
    target = llama_worker.load(settings(stand_in, "draft"))
    assert target.step == 1 and target.draft_model.llama.step == 2 and target.draft_model.k == 3
    new = llama_worker.decode(target, [4, 9], 4, [], llama_worker.GREEDY)
    assert new == expected([4, 9], 1, 4)
    drafts = [(step, detail) for step, event, detail in fake_llama.CALLS if event == "drafted"]
    contexts = [[4, 9, *new[:i + 1]] for i in range(3)]  # the draft is asked after each token but the last
    assert drafts == [(1, expected(context, 2, 3)) for context in contexts]
    draft_feeds = [detail for step, event, detail in fake_llama.CALLS if step == 2 and event == "feed"]
    assert draft_feeds[0] == 3  # the draft's first call feeds the whole context, later ones only what is new
    assert all(n <= 2 for n in draft_feeds[1:])
    llama_worker.decode(target, [4, 9], 1, [], llama_worker.GREEDY)
    assert target.draft_model.llama.cached == []  # a new prompt forgets the draft's cache too


def test_the_lookup_mode_is_the_bindings_prompt_lookup_and_plain_has_no_drafter(stand_in, fake_llama):
    lookup = llama_worker.load(settings(stand_in, "lookup", lookup_ngram=3, lookup_tokens=5)).draft_model
    assert type(lookup).__name__ == "LlamaPromptLookupDecoding"
    assert (lookup.max_ngram_size, lookup.num_pred_tokens) == (3, 5)
    assert llama_worker.load(settings(stand_in)).draft_model is None
    with pytest.raises(ValueError, match="unknown llama.cpp mode"):
        llama_worker.load(settings(stand_in, "tree"))


def test_a_long_context_fits_every_mode_the_drafters_with_all_logits_kept_for_n_ctx(stand_in, fake_llama):
    """The binding keeps all logits under a drafter but sizes their buffer n_batch rows unless
    `logits_all=True` (then n_ctx): a prompt past n_batch (a Spec-Bench summary past 512) overran it."""
    prompt = [(7 * i) % 26 + 65 for i in range(40)]  # past the stand-in's n_batch of 16, within n_ctx 64
    for mode in (None, "lookup", "draft"):
        target = llama_worker.load(settings(stand_in, mode))
        assert llama_worker.decode(target, prompt, 8, [], llama_worker.GREEDY) == expected(prompt, 1, 8)
        assert target.logits_all is (mode is not None)  # plain decoding keeps only the last logits
        if mode == "draft":
            assert target.draft_model.llama.logits_all is False  # the draft model's Llama too


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("pair"))


def test_the_bench_times_llama_cpp_beside_the_engine_without_comparing_its_text(pair, stand_in, tmp_path, capsys):
    target, draft = pair
    _, python, target_gguf, draft_gguf = stand_in
    out = tmp_path / "out"
    code = main(["bench", "--target", str(target), "--draft", str(draft), "--dtype", "float32", "--threads", "1",
                 "--max-new-tokens", "8", "--num-prompts", "2",
                 "--methods", "ouroboros,llama_cpp,llama_cpp_lookup,llama_cpp_draft", "--llama-python", python,
                 "--llama-gguf", f"{target_gguf},{draft_gguf}", "--llama-k", "3", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    (run,) = results["runs"]
    assert run["overall"]["ouroboros"]["identical_share"] == 1.0 and run["overall"]["ouroboros"]["compared"]
    vanilla = [json.loads(line)["choices"][0]["turns"]
               for line in (out / "answers" / "hf_vanilla-temp-0.jsonl").read_text().splitlines()]
    for name in ("llama_cpp", "llama_cpp_lookup", "llama_cpp_draft"):
        figures = run["overall"][name]
        assert figures["compared"] is False and figures["identical_share"] is None and figures["divergences"] == []
        assert figures["tokens_per_second"] > 0 and figures["speedup"] > 0 and figures["mean_accepted"] is None
        rows = [json.loads(line) for line in (out / "answers" / f"{name}-temp-0.jsonl").read_text().splitlines()]
        assert [row["choices"][0]["new_tokens"][0] for row in rows] == [8, 8]
        assert [row["choices"][0]["turns"] for row in rows] != vanilla  # other text, yet no mismatch counted
        assert all("identical" not in q["methods"][name] for q in run["questions"])
    peers = results["settings"]["peers"]
    assert peers["llama_cpp"]["mode"] is None and peers["llama_cpp"]["num_draft_tokens"] is None
    assert peers["llama_cpp_lookup"]["num_draft_tokens"] == 10
    assert peers["llama_cpp_draft"]["num_draft_tokens"] == 3 and peers["llama_cpp_draft"]["draft_gguf"] == draft_gguf
    assert peers["llama_cpp"]["version"] == "0.0-stand-in" and "numeric model" in peers["llama_cpp"]["numeric_model"]
    assert "stand-in llama.cpp loads" in (out / "llama_cpp.log").read_text()
    assert "drafted 3" in (out / "llama_cpp_draft.log").read_text()
    assert "drafted" not in (out / "llama_cpp.log").read_text()
    table = capsys.readouterr().out
    assert "llama_cpp_draft [Q]" in table and OTHER_MODEL_NOTE in table and "ouroboros [Q]" not in table
    assert "differ from hf_vanilla" not in table
    (row,) = [line for line in table.splitlines() if line.startswith("llama_cpp_draft [Q]")]
    assert row.split()[-1] == "-"  # identical: not a percentage, not compared


def test_a_worker_that_cannot_start_is_an_error_naming_its_log(stand_in, tmp_path, monkeypatch):
    monkeypatch.setenv("STAND_IN_FAIL", "1")
    _, python, target_gguf, _ = stand_in
    with pytest.raises(LlamaError, match=r"llama\.cpp worker failed: .*refused to start.*llama_cpp\.log"):
        LlamaPeer(LlamaSettings(python, target_gguf, None, 64, 1), tmp_path / "llama_cpp.log", progress=False)


def test_llama_methods_say_what_they_need(pair, stand_in, tmp_path, capsys):
    target, draft = pair
    _, python, target_gguf, _ = stand_in
    common = ["bench", "--target", str(target), "--draft", str(draft), "--dtype", "float32", "--num-prompts", "1",
              "--out", str(tmp_path / "out")]
    assert main([*common, "--methods", "llama_cpp"]) == 2
    assert "--llama-python" in capsys.readouterr().err
    assert main([*common, "--methods", "llama_cpp", "--llama-python", python]) == 2
    assert "give --llama-gguf" in capsys.readouterr().err
    assert main([*common, "--methods", "llama_cpp", "--llama-python", str(tmp_path / "nothing")]) == 2
    assert "not an executable" in capsys.readouterr().err
    with pytest.raises(InvalidArgumentError, match="draft's GGUF too"):
        gguf_files(["llama_cpp_draft"], target_gguf, builtin=False)
    with pytest.raises(InvalidArgumentError, match="no file"):
        gguf_files(["llama_cpp"], str(tmp_path / "missing.gguf"), builtin=True)
    assert gguf_files(["llama_cpp"], target_gguf, builtin=True) == (target_gguf, None)
    assert llama_makers([], None, None, builtin=False, n_ctx=64, threads=1, draft_tokens=4, log_dir=tmp_path) == {}


def test_the_default_methods_include_llama_only_with_its_python_and_batches_leave_it_out(capsys):
    args = argparse.Namespace(ablation=False, methods=None, batch=1)
    llama = {"llama_cpp", "llama_cpp_lookup", "llama_cpp_draft"}
    assert llama <= {m.name for m in resolve_methods(args, llama_available=True)}
    assert not llama & {m.name for m in resolve_methods(args, peers_available=True)}
    batched = argparse.Namespace(ablation=False, methods="vllm,llama_cpp", batch=2)
    assert [m.name for m in resolve_methods(batched)] == ["hf_vanilla", "vllm"]
    assert "skipping llama_cpp, which cannot batch" in capsys.readouterr().err


def test_the_built_in_pairs_gguf_is_joined_once_into_the_cache(tmp_path, monkeypatch):
    joined = []

    def gguf_file(role, dest, progress=True):
        joined.append(role)
        if os.environ.get("JOIN_FAILS"):
            open(dest, "wb").write(b"half")
            raise RuntimeError("a part is damaged")
        open(dest, "wb").write(role.encode())

    monkeypatch.setattr(llama_peer.default_pair, "gguf_file", gguf_file)
    target, draft = gguf_files(["llama_cpp", "llama_cpp_draft"], None, builtin=True, cache=tmp_path)
    assert open(target, "rb").read() == b"target" and open(draft, "rb").read() == b"draft"
    assert target.startswith(str(tmp_path / "gguf")) and target.endswith(".gguf")
    assert gguf_files(["llama_cpp"], None, builtin=True, cache=tmp_path) == (target, None)
    assert joined == ["target", "draft"]
    monkeypatch.setenv("JOIN_FAILS", "1")
    with pytest.raises(RuntimeError, match="damaged"):
        gguf_files(["llama_cpp"], None, builtin=True, cache=tmp_path / "other")
    assert list((tmp_path / "other" / "gguf").iterdir()) == []  # neither a half file nor a final one


@pytest.mark.skipif(not os.environ.get("OUROBOROS_LLAMA_PYTHON"),
                    reason="set OUROBOROS_LLAMA_PYTHON to a Python with llama-cpp-python")
def test_real_llama_cpp_decodes_the_built_in_targets_gguf_in_every_mode(tmp_path):
    from transformers import AutoTokenizer

    from ouroboros.default_pair import default_pair_dirs

    python = os.environ["OUROBOROS_LLAMA_PYTHON"]
    tokenizer = AutoTokenizer.from_pretrained(default_pair_dirs()[0])
    prompt = tokenizer('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n')["input_ids"]
    names = list(llama_peer.MODES)
    makers = llama_makers(names, python, None, builtin=True, n_ctx=512, threads=2, draft_tokens=4, log_dir=tmp_path)
    rows = {}
    with started(makers) as peers:
        for name, peer in peers.items():
            assert peer.version.startswith("0.")
            (rows[name],), seconds = peer.generate([prompt], 24, [tokenizer.eos_token_id])
            assert len(rows[name]) == 24 and seconds > 0
    text = tokenizer.decode(rows["llama_cpp"])
    assert "return" in text or "if n" in text, text
    assert rows["llama_cpp_draft"][:8] == rows["llama_cpp_lookup"][:8] == rows["llama_cpp"][:8]
