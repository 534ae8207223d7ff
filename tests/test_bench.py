"""`ouroboros bench` end to end on a tiny random pair: every output file present and well-formed."""

from __future__ import annotations

import dataclasses
import json

import pytest
from tiny_models import save_tiny_pair

from ouroboros.bench import ABLATION_METHODS, DEFAULT_METHODS, Question, cut_at_eos, select_questions
from ouroboros.cli import main

ENGINE_METHODS = ("speculative", "lookahead", "prompt_lookup", "ouroboros", "ouroboros_warm")
HF_METHODS = ("hf_vanilla", "hf_assisted", "hf_prompt_lookup")
QUESTIONS = [
    {"question_id": 1, "category": "qa", "turns": ["Who wrote the play Hamlet?"]},
    {"question_id": 2, "category": "translation", "turns": ["Translate to English: Guten Morgen, wie geht es?"]},
    {"question_id": 3, "category": "qa", "turns": ["What is the capital of France?", "And of Spain?"]},
    {"question_id": 4, "category": "translation", "turns": ["Translate to English: Danke schoen."]},
]
ANSWER_CHOICE_KEYS = {"index", "turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths"}
FIGURE_KEYS = {"questions", "new_tokens", "wall_time", "tokens_per_second", "speedup", "mean_accepted",
               "target_forwards_per_token", "draft_forwards_per_token", "identical_share", "divergences"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    target, draft = save_tiny_pair(tmp_path_factory.mktemp("pair"))
    return ["--target", str(target), "--draft", str(draft), "--dtype", "float32", "--threads", "1"]


@pytest.fixture
def questions(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS), encoding="utf-8")
    return path


def bench(pair, *options) -> int:
    return main(["bench", *pair, "--max-new-tokens", "8", *options])


def read_answers(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_answer_files(results, out, question_ids, methods):
    """One Spec-Bench answer line per question and method, with the fields speed.py reads."""
    for temperature, files in results["files"]["answers"].items():
        assert sorted(files) == sorted(methods)
        for method, path in files.items():
            assert path.startswith(str(out))
            rows = read_answers(out / "answers" / f"{method}-temp-{temperature}.jsonl")
            assert [row["question_id"] for row in rows] == question_ids
            for row in rows:
                assert {"question_id", "category", "answer_id", "model_id", "choices", "tstamp"} <= set(row)
                choice = row["choices"][0]
                assert set(choice) == ANSWER_CHOICE_KEYS and choice["index"] == 0
                turns = len(choice["turns"])
                assert turns >= 1 and all(isinstance(text, str) for text in choice["turns"])
                for key in ("new_tokens", "wall_time", "decoding_steps"):
                    assert len(choice[key]) == turns
                assert all(1 <= n <= 8 for n in choice["new_tokens"])
                assert all(t > 0 for t in choice["wall_time"])
                if method in HF_METHODS:
                    assert choice["accept_lengths"] == []
                else:
                    assert sum(choice["accept_lengths"]) == sum(choice["new_tokens"])


def test_spec_bench_end_to_end(pair, questions, tmp_path, capsys):
    out = tmp_path / "out"
    assert bench(pair, "--questions", str(questions), "--num-prompts", "3", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "speedup" in printed and "includes prefill" in printed and "ouroboros_warm" in printed

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert {"settings", "arguments", "command", "versions", "machine", "runs", "files"} <= set(results)
    assert set(results["versions"]) == {"python", "torch", "transformers", "ouroboros"}
    assert {"platform", "cpu_count", "torch_threads"} <= set(results["machine"])
    settings = results["settings"]
    assert settings["question_ids"] == [1, 2, 3] and settings["prompt_format"] == "chat template"
    assert settings["dtype"] == "float32" and settings["max_new_tokens"] == 8 and "prefill" in settings["timing"]
    assert settings["methods"] == list(DEFAULT_METHODS)

    (run,) = results["runs"]
    assert run["temperature"] == 0 and run["sampling"] is False
    assert set(run["categories"]) == {"qa", "translation"}
    for scope in [run["overall"], *run["categories"].values()]:
        assert set(scope) == set(DEFAULT_METHODS)
        for figures in scope.values():
            assert FIGURE_KEYS <= set(figures) and figures["tokens_per_second"] > 0
    overall = run["overall"]
    assert overall["hf_vanilla"]["speedup"] == pytest.approx(1.0)
    assert run["categories"]["qa"]["ouroboros"]["questions"] == 2
    for method in HF_METHODS:
        assert overall[method]["mean_accepted"] is None
    for method in ENGINE_METHODS:
        assert overall[method]["mean_accepted"] >= 1
        assert overall[method]["identical_share"] == 1.0, overall[method]["divergences"]
    assert overall["hf_vanilla"]["target_forwards_per_token"] == pytest.approx(1.0)
    assert [q["question_id"] for q in run["questions"]] == [1, 2, 3]

    check_answer_files(results, out, [1, 2, 3], DEFAULT_METHODS)
    png = (out / "speedup.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_humaneval(pair, tmp_path):
    out = tmp_path / "out"
    assert bench(pair, "--num-prompts", "2", "--start", "1", "--methods", "ouroboros,prompt_lookup",
                 "--out", str(out)) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["settings"]["dataset"] == "humaneval"
    assert results["settings"]["prompt_format"] == "raw text"
    assert results["settings"]["methods"] == ["hf_vanilla", "ouroboros", "prompt_lookup"]
    (run,) = results["runs"]
    assert list(run["categories"]) == ["humaneval"]
    assert run["overall"]["ouroboros"]["identical_share"] == 1.0
    check_answer_files(results, out, ["HumanEval/1", "HumanEval/2"], ["hf_vanilla", "ouroboros", "prompt_lookup"])
    assert (out / "speedup.png").stat().st_size > 0


def test_ablation_all_turns(pair, questions, tmp_path):
    out = tmp_path / "out"
    assert bench(pair, "--questions", str(questions), "--start", "1", "--num-prompts", "2", "--all-turns",
                 "--ablation", "--out", str(out)) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    (run,) = results["runs"]
    assert list(run["overall"]) == list(ABLATION_METHODS)
    for method in ABLATION_METHODS:
        assert run["overall"][method]["identical_share"] == 1.0
    check_answer_files(results, out, [2, 3], ABLATION_METHODS)
    rows = read_answers(out / "answers" / "ouroboros_no_harvest-temp-0.jsonl")
    assert [len(row["choices"][0]["turns"]) for row in rows] == [1, 2]


def test_the_classic_variant_turns_every_adaptive_switch_off(monkeypatch):
    """`ouroboros_classic` is the method before issue 11: its generate call gets the config with the
    four adaptive switches off and every other setting as the run's."""
    from tiny_models import tiny_model

    import ouroboros.bench.running as running
    from ouroboros import OuroborosConfig
    from ouroboros.bench import Bench, contestants

    seen = []

    def generate(*args, config, **kwargs):
        seen.append(config)
        raise KeyboardInterrupt  # enough: the config is what this test reads

    monkeypatch.setattr(running, "generate", generate)
    base = OuroborosConfig(gamma=5)
    bench = Bench(tiny_model(vocab=50), None, None, [0], 0, False, 8, base, 1.0, 0, "cpu")
    with pytest.raises(KeyboardInterrupt):
        running.run_turn(bench, contestants()["ouroboros_classic"], [3, 4], max_new_tokens=4, temperature=0.0,
                         seed=0, pool=None)
    assert seen == [base.classic()] and seen[0].gamma == 5 and seen[0] != base


def test_sampling(pair, questions, tmp_path, capsys):
    out = tmp_path / "out"
    code = bench(pair, "--questions", str(questions), "--num-prompts", "2", "--temperature", "0", "0.7",
                 "--methods", "hf_assisted,ouroboros", "--out", str(out))
    assert code == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    greedy, sampled = results["runs"]
    assert sampled["temperature"] == 0.7 and sampled["sampling"] is True
    assert sampled["overall"]["ouroboros"]["identical_share"] is None
    assert sampled["overall"]["ouroboros"]["mean_accepted"] >= 1
    assert sampled["overall"]["hf_assisted"]["speedup"] > 0
    check_answer_files(results, out, [1, 2], ["hf_vanilla", "hf_assisted", "ouroboros"])


def test_missing_questions_file(pair, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "question.jsonl"
    assert bench(pair, "--questions", str(missing), "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "questions file not found" in err and str(missing) in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, message", [
    (["--methods", "ouroboros,turbo"], "unknown method 'turbo'"),
    (["--num-prompts", "0"], "--num-prompts must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--temperature", "-1"], "--temperature must be"),
    (["--top-p", "0"], "--top-p must be"),
    (["--start", "99"], "--start 99 is past"),
    (["--categories", "poetry"], "unknown categories poetry"),
    (["--ablation", "--methods", "ouroboros"], "not both"),
])
def test_bad_input(pair, questions, tmp_path, capsys, options, message):
    assert bench(pair, "--questions", str(questions), "--out", str(tmp_path / "out"), *options) == 2
    assert message in capsys.readouterr().err


def test_bad_question_file(pair, tmp_path, capsys):
    path = tmp_path / "question.jsonl"
    path.write_text('{"question_id": 1, "category": "qa", "turns": ["hi"]}\n{"question_id": 2}\n', encoding="utf-8")
    assert bench(pair, "--questions", str(path)) == 2
    assert f"{path}:2: missing category, turns" in capsys.readouterr().err


def test_select_questions():
    questions = [Question(i, category, ["q"] * 2) for i, category in
                 enumerate(["writing", "coding", "qa", "qa", "math", "rag"])]
    picked = select_questions(questions, start=0, num_prompts=None, categories=["mt_bench", "qa"], per_category=1,
                              all_turns=False)
    assert [q.question_id for q in picked] == [0, 2] and all(len(q.turns) == 1 for q in picked)
    assert [q.group for q in picked] == ["mt_bench", "qa"]
    picked = select_questions(questions, start=1, num_prompts=2, categories=None, per_category=None, all_turns=True)
    assert [q.question_id for q in picked] == [1, 2] and len(picked[0].turns) == 2
    picked = select_questions(questions, start=0, num_prompts=None, categories=None, per_category=1, all_turns=False,
                              group_start=1)  # each group's second: mt_bench's (0, 1, 4) and qa's (2, 3); rag has one
    assert [q.question_id for q in picked] == [1, 3]
    picked = select_questions(questions, start=0, num_prompts=None, categories=None, per_category=None,
                              all_turns=False, group_start=1)
    assert [q.question_id for q in picked] == [1, 3, 4]


def test_cut_at_eos():
    assert cut_at_eos([5, 7, 2, 9, 2], [2, 3]) == [5, 7, 2]
    assert cut_at_eos([5, 7], [2]) == [5, 7]


def test_first_divergence_reports_the_logit_gap():
    import torch
    from tiny_models import tiny_model

    from ouroboros import OuroborosConfig
    from ouroboros.bench import Answer, Bench, Turn, contestants, first_divergence

    target = tiny_model(vocab=50)
    bench = Bench(target, None, None, [0], 0, False, 8, OuroborosConfig(), 1.0, 0, "cpu")
    prompt = [3, 4, 5]

    def answer(name, tokens):
        return Answer(contestants()[name], [Turn(prompt, tokens, "", 1.0, len(tokens), 0, None)])

    vanilla = answer("hf_vanilla", [7, 8, 9, 10])
    assert first_divergence(bench, vanilla, answer("ouroboros", [7, 8, 9, 10]), greedy=True) is None
    record = first_divergence(bench, vanilla, answer("ouroboros", [7, 8, 11, 12]), greedy=True)
    assert record["turn"] == 0 and record["index"] == 2
    assert record["vanilla_token"] == 9 and record["method_token"] == 11
    with torch.inference_mode():
        logits = target(torch.tensor([prompt + [7, 8]])).logits[0, -1]
    top = logits.topk(2).values
    assert record["top2_gap"] == pytest.approx(float(top[0] - top[1]), abs=1e-5)
    assert record["vanilla_minus_method_logit"] == pytest.approx(float(logits[9] - logits[11]), abs=1e-5)
    record = first_divergence(bench, vanilla, answer("ouroboros", [7, 8, 9]), greedy=False)
    assert record == {"turn": 0, "index": 3, "vanilla_token": 10, "method_token": None}


def test_interrupted_run_keeps_completed_prompts(pair, questions, tmp_path, capsys, monkeypatch):
    """A SIGTERM mid-run (as `kill` sends to a background bench) drops the prompt in progress and
    still writes results, the chart and the table for the prompts every method completed."""
    import os
    import signal

    import ouroboros.bench.running as bench_module

    real_run_question = bench_module.run_question
    calls = []

    def run_question(bench_, method, question, **kwargs):
        calls.append((question.question_id, method.name))
        if question.question_id == 2 and method.name == "speculative":
            os.kill(os.getpid(), signal.SIGTERM)
        return real_run_question(bench_, method, question, **kwargs)

    monkeypatch.setattr(bench_module, "run_question", run_question)
    out = tmp_path / "out"
    code = bench(pair, "--questions", str(questions), "--methods", "hf_vanilla,speculative,ouroboros",
                 "--out", str(out))
    assert code == 130
    assert calls[-1] == (2, "speculative")
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    run = results["runs"][0]
    assert run["interrupted"] is True and run["completed_prompts"] == 1
    assert [q["question_id"] for q in run["questions"]] == [1]
    assert run["overall"]["hf_vanilla"]["questions"] == 1
    assert (out / "speedup.png").stat().st_size > 0
    assert "interrupted; figures cover the 1 completed prompts" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is not signal.default_int_handler


def test_target_alone_runs_the_methods_without_a_draft(questions, tmp_path, capsys):
    target, _ = save_tiny_pair(tmp_path / "pair")
    alone = ["--target", str(target), "--dtype", "float32", "--threads", "1"]
    out = tmp_path / "out"
    assert bench(alone, "--questions", str(questions), "--num-prompts", "1", "--methods",
                 "vanilla,prompt_lookup,lookahead", "--out", str(out)) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["runs"][0]["overall"]["lookahead"]["draft_forwards_per_token"] == 0
    assert bench(alone, "--questions", str(questions), "--methods", "prompt_lookup,speculative") == 2
    assert "speculative needs a draft model: give both --target and --draft" in capsys.readouterr().err


def test_a_table_column_is_one_entry():
    """A new figure (e.g. a replayed cost) shows in the table by adding one Column."""
    from ouroboros.bench import TABLE_COLUMNS, Column, format_table

    figures = {"tokens_per_second": 10.0, "speedup": 1.5, "mean_accepted": 2.0, "target_forwards_per_token": 0.5,
               "draft_forwards_per_token": 2.0, "identical_share": 1.0, "divergences": [], "replayed": 0.25,
               "batch": 4, "aggregate_tokens_per_second": 32.0, "aggregate_speedup": 2.5, "mean_latency": 3.25}
    run = {"temperature": 0.0, "sampling": False, "overall": {"ouroboros": figures}, "categories": {"qa": {}}}
    plain = format_table(run, 1, 8).splitlines()
    extended = format_table(run, 1, 8, TABLE_COLUMNS + (Column("replayed ms", 12, lambda f: f["replayed"]),))
    extended = extended.splitlines()
    assert extended[3] == plain[3] + f"{'replayed ms':>12}" and extended[4] == plain[4] + f"{'0.25':>12}"
    assert plain[4].split() == ["ouroboros", "10.00", "1.50x", "4", "32.00", "2.50x", "3.25", "2.00", "0.50", "2.00",
                                "100%"]


def test_costs_replay_each_method_on_a_cost_table(pair, questions, tmp_path, capsys):
    """--costs prices every method's forwards on a table: hf_vanilla replays as plain decoding
    (so its replayed speedup is 1), engine methods from their forward logs, HF's others not at all."""
    row = {k: 100.0 + k for k in (1, 2, 4, 8, 16, 32)}
    table = {"target": {"forward_ms": {"64": row, "512": row}, "prefill_ms": {"16": 200.0, "1024": 2000.0}},
             "draft": {"forward_ms": {"64": row}, "prefill_ms": {"16": 100.0, "1024": 1000.0}}}
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(table))
    out = tmp_path / "out"
    methods = "hf_vanilla,hf_assisted,vanilla,prompt_lookup,ouroboros,auto"
    assert bench(pair, "--questions", str(questions), "--num-prompts", "2", "--methods", methods,
                 "--costs", str(costs), "--out", str(out)) == 0
    assert "replayed x" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["settings"]["replayed_on"]["costs"] == str(costs)
    figures = results["runs"][0]["overall"]
    assert figures["hf_vanilla"]["replayed_speedup"] == pytest.approx(1.0)
    assert figures["vanilla"]["replayed_speedup"] == pytest.approx(1.0)  # the same forwards as HF greedy
    assert figures["hf_assisted"]["replayed_tokens_per_second"] is None
    for name in ("prompt_lookup", "ouroboros", "auto"):
        assert figures[name]["replayed_tokens_per_second"] > 0


def test_a_bad_cost_file_is_refused_before_the_run(pair, questions, tmp_path, capsys):
    costs = tmp_path / "broken.json"
    costs.write_text("{truncated")
    assert bench(pair, "--questions", str(questions), "--costs", str(costs), "--out", str(tmp_path / "o")) == 2
    assert "broken.json" in capsys.readouterr().err


def test_warm_up_compiles_every_cache_size_before_the_timed_prompts(monkeypatch):
    """A prompt that needs a longer KV cache on the fast path (one more compiled graph per model)
    gets a full untimed run of each compiled method first, so no timed prompt pays for compiling.
    Found when a Spec-Bench article prompt spent ~35 s of its timed run compiling."""
    from types import SimpleNamespace

    from tiny_models import tiny_model

    import ouroboros.bench.running as running
    from ouroboros import OuroborosConfig
    from ouroboros.bench import Bench, contestants

    calls = []
    monkeypatch.setattr(running, "run_question", lambda bench_, method, question, **kwargs: calls.append(
        (question.question_id, method.name, kwargs.get("max_new_tokens"))))
    characters_are_tokens = lambda text: SimpleNamespace(input_ids=list(range(len(text))))  # noqa: E731
    bench = Bench(tiny_model(vocab=50), None, characters_are_tokens, [0], 0, False, 128, OuroborosConfig(), 1.0, 0,
                  "cpu", fast=True)
    questions = [Question(i, "qa", ["x" * length]) for i, length in enumerate((100, 900, 950, 3000))]
    table = contestants()
    running.warm_up(bench, [table["hf_vanilla"], table["ouroboros"], table["vanilla_eager"]], questions, 0.0)
    assert calls == [(0, "hf_vanilla", 16), (0, "ouroboros", 16), (0, "vanilla_eager", 16),
                     (1, "ouroboros", None), (3, "ouroboros", None)]
    calls.clear()
    running.warm_up(dataclasses.replace(bench, fast=False), [table["ouroboros"]], questions, 0.0)
    assert calls == [(0, "ouroboros", 16)]


def test_batch_runs_each_group_in_one_call(pair, tmp_path, capsys):
    """--batch 2 on 4 prompts: every contestant that batches runs each pair of prompts in one call (so
    both rows of a group share one latency), vanilla and ouroboros also one prompt at a time (the
    second row waits for the first), methods that cannot batch are skipped with a note, and every
    batched row is token-identical to hf_vanilla's row of its left-padded batch."""
    out = tmp_path / "out"
    assert bench(pair, "--num-prompts", "4", "--batch", "2", "--methods", "vanilla,ouroboros,prompt_lookup,auto,"
                 "hf_assisted", "--out", str(out)) == 0
    printed = capsys.readouterr()
    assert "--batch 2: skipping hf_assisted, which cannot batch" in printed.err
    assert "agg tok/s" in printed.out and "peak RSS" in printed.out
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    methods = ["hf_vanilla", "vanilla", "vanilla_sequential", "ouroboros", "ouroboros_sequential", "prompt_lookup",
               "auto", "auto_sequential"]
    assert results["settings"]["methods"] == methods and results["settings"]["batch"] == 2
    assert results["settings"]["peak_rss_mib"] > 0
    (run,) = results["runs"]
    assert run["batch"] == 2 and run["peak_rss_mib"] > 0
    overall = run["overall"]
    assert overall["hf_vanilla"]["aggregate_speedup"] == pytest.approx(1.0)
    for name in methods:
        figures = overall[name]
        assert figures["batch"] == (1 if name.endswith("_sequential") else 2)
        assert figures["aggregate_tokens_per_second"] > 0 and figures["aggregate_speedup"] > 0
        assert figures["mean_latency"] > 0
        assert figures["identical_share"] == 1.0, figures["divergences"]
    questions = run["questions"]
    assert [q["batch_group"] for q in questions] == [0, 0, 1, 1]
    for first, second in (questions[0:2], questions[2:4]):
        for name in methods:
            a, b = first["methods"][name], second["methods"][name]
            if name.endswith("_sequential"):
                assert b["latency"] == pytest.approx(a["latency"] + b["wall_time"])
            else:
                assert a["latency"] == b["latency"] == a["wall_time"] == b["wall_time"]
    check_answer_files(results, out, [f"HumanEval/{i}" for i in range(4)], methods)


@pytest.mark.parametrize("options, message", [
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--batch", "-3"], "--batch must be >= 1, got -3"),
    (["--batch", "2", "--costs", "here"], "--costs replays single-stream forwards"),
])
def test_bad_batch(pair, tmp_path, capsys, options, message):
    assert bench(pair, "--num-prompts", "2", "--out", str(tmp_path / "out"), *options) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_vllm_worker_submits_a_group_in_one_generate_call(monkeypatch):
    """vLLM gets a group's prompts in one `LLM.generate` call and answers each row in order."""
    import io
    import sys
    import types

    from ouroboros.bench import vllm_worker

    calls = []

    class LLM:
        def __init__(self, **engine):
            pass

        def generate(self, prompts, params, use_tqdm):
            calls.append([prompt["prompt_token_ids"] for prompt in prompts])
            outputs = [[*ids[-1:], params.max_tokens] for ids in calls[-1]]
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=tokens)]) for tokens in outputs]

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams, fake.__version__ = LLM, lambda **params: types.SimpleNamespace(**params), "0"
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    request = {"prompts": [[1, 2], [3, 4, 5], [6]], "max_new_tokens": 9, "eos_ids": [0], "temperature": 0.0}
    replies = io.StringIO()
    vllm_worker.serve({"target": "t", "dtype": "float32", "max_model_len": 64}, [json.dumps(request) + "\n"], replies)
    ready, reply = [json.loads(line) for line in replies.getvalue().splitlines()]
    assert ready["ready"] is True
    assert calls == [[[1, 2], [3, 4, 5], [6]]]
    assert reply["rows"] == [[2, 9], [5, 9], [6, 9]] and reply["seconds"] >= 0


def test_a_cost_table_dropped_by_a_run_is_measured_again_before_the_next_timed_call(monkeypatch):
    """auto drops a cost table a run shows wrong (e.g. under load); the bench measures it again
    between prompts, untimed, so that no timed prompt pays for the measurement."""
    from types import SimpleNamespace

    import torch
    from tiny_models import tiny_model

    from ouroboros import OuroborosConfig
    from ouroboros.bench import Bench, contestants, running
    from ouroboros.engine import engine_for

    target = tiny_model(vocab=50)
    words = SimpleNamespace(decode=lambda tokens, skip_special_tokens: " ".join(map(str, tokens)))
    bench = Bench(target, None, words, [0], 0, False, 8, OuroborosConfig(), 1.0, 0, "cpu", fast=False)
    engine = engine_for(target, None, False)
    engine.costs()
    engine._costs = None  # what `Engine.check_costs` leaves after dropping the table
    present = []
    timed = running._timed
    monkeypatch.setattr(running, "_timed", lambda bench, call: (present.append(engine._costs is not None),
                                                                timed(bench, call))[1])
    with torch.inference_mode():
        running.run_batch(bench, contestants()["auto"], [[3, 4, 5]], max_new_tokens=4, temperature=0.0, seed=0,
                          pool=None)
    assert present == [True]
