"""Bad input gets a clear error naming the problem, before any work; the CLI end to end."""

import pytest
import torch
from tiny_models import save_tiny_pair, tiny_model, tiny_tokenizer

from ouroboros import OuroborosConfig, PhrasePool, UnsupportedModelError, generate
from ouroboros.cli import main
from ouroboros.loading import check_same_tokenizer

IDS = torch.tensor([[1, 2, 3]])


@pytest.fixture(scope="module")
def pair():
    return tiny_model("llama", seed=0, vocab=40, context=64), tiny_model("llama", seed=1, vocab=40, context=64)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(input_ids=torch.tensor([[]], dtype=torch.long)), ValueError, "prompt is empty"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=2.5), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=62), ValueError, "context of 64"),
    (dict(method="beam"), ValueError, "unknown method 'beam'"),
    (dict(input_ids=torch.tensor([[1, 2], [3, 4]]), attention_mask=torch.ones(2, 3)), ValueError,
     "attention_mask must be a tensor of input_ids' shape"),
    (dict(input_ids=torch.tensor([[1, 99]])), ValueError, "outside the target's vocabulary"),
    (dict(input_ids=torch.tensor([[1.0, 2.0]])), TypeError, "integer token ids"),
    (dict(input_ids=[1, 2, 3]), TypeError, "torch.LongTensor"),
    (dict(draft=None), ValueError, "needs a draft model"),
    (dict(config={"gamma": 3}), TypeError, "OuroborosConfig"),
    (dict(pool=PhrasePool(level=5)), ValueError, "config.level is 4"),
    (dict(eos_token_id="</s>"), ValueError, "eos_token_id"),
])
def test_bad_arguments(pair, kwargs, error, message):
    target, draft = pair
    args = dict(input_ids=IDS, draft=draft, max_new_tokens=4, config=OuroborosConfig())
    args.update(kwargs)
    with pytest.raises(error, match=message):
        generate(target, args.pop("input_ids"), **args)


def test_draft_with_another_vocabulary(pair):
    target, _ = pair
    with pytest.raises(ValueError, match="vocabulary"):
        generate(target, IDS, draft=tiny_model("llama", vocab=41), max_new_tokens=4)


def test_model_without_custom_mask_support_is_named(pair):
    target, _ = pair
    flash = tiny_model("llama", seed=5, vocab=40)
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*flash_attention_2"):
        generate(target, IDS, draft=flash, max_new_tokens=2)


def test_mismatched_tokenizers_are_named():
    a = tiny_tokenizer()
    b = tiny_tokenizer()
    b.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="tokenizers differ.*only in draft: \\['<extra>'\\]"):
        check_same_tokenizer(a, b)


def test_streamer_gets_the_prompt_then_every_new_token(pair):
    target, draft = pair

    class Recorder:
        def __init__(self):
            self.calls, self.ended = [], False

        def put(self, value):
            self.calls.append(value.tolist())

        def end(self):
            self.ended = True

    recorder = Recorder()
    out = generate(target, IDS, draft=draft, max_new_tokens=12, eos_token_id=[], streamer=recorder)
    assert recorder.calls[0] == [[1, 2, 3]] and recorder.ended
    assert sum(recorder.calls[1:], []) == out.sequences[0, 3:].tolist()


def test_cli_generate_streams_text_and_prints_a_summary(tmp_path, capsys):
    from ouroboros.loading import load_pair

    target_dir, draft_dir = save_tiny_pair(tmp_path)
    code = main(["generate", "--target", str(target_dir), "--draft", str(draft_dir), "--dtype", "float32",
                 "--max-new-tokens", "12", "--gamma", "3", "hello there"])
    captured = capsys.readouterr()
    assert code == 0
    assert "tokens/s" in captured.err and "tokens per target forward" in captured.err
    target, draft, tokenizer = load_pair(target_dir, draft_dir, dtype="float32")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    out = generate(target, ids, draft=draft, max_new_tokens=12, config=OuroborosConfig(gamma=3))
    expected = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
    assert captured.out.rstrip("\n") == expected.rstrip("\n")
    assert f"{out.stats.new_tokens} tokens" in captured.err


@pytest.mark.parametrize("argv, message", [
    (["generate", "--gamma", "0", "hi"], "gamma"),
    (["generate", "--target", "/nonexistent/t", "--draft", "/nonexistent/d", "hi"], "not found"),
    (["generate", "--method", "ouroboros", "--target", "/nonexistent/t", "hi"], "give both"),
    (["generate", "--dtype", "float8", "--target", "/a", "--draft", "/b", "hi"], "dtype"),
    (["generate", "   "], "prompt is empty"),
    (["generate", "--temperature", "-1", "--target", "/a", "--draft", "/b", "hi"], "temperature"),
])
def test_cli_errors_name_the_problem(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


# --- what a new user trips on: one clear line before anything loads, bugs keep their traceback ---------------

@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command gets as far as loading models."""
    import ouroboros.loading

    def load_pair(*args, **kwargs):
        raise AssertionError("models were loaded before the arguments were checked")

    monkeypatch.setattr(ouroboros.loading, "load_pair", load_pair)


@pytest.mark.parametrize("argv, message", [
    (["generate", "--device", "cuda", "hi"], "--device cuda: torch"),
    (["generate", "--device", "cuda:1", "hi"], "sees no cuda device"),
    (["generate", "--device", "tpu", "hi"], "--device 'tpu' is not a torch device"),
    (["tune", "--device", "cuda"], "sees no cuda device"),
    (["generate", "--max-new-tokens", "-1", "hi"], "--max-new-tokens must be >= 1, got -1"),
    (["generate", "--max-new-tokens", "0", "hi"], "--max-new-tokens must be >= 1"),
    (["generate", "--threads", "0", "hi"], "--threads must be >= 1"),
    (["generate", "--top-k", "-1", "hi"], "top_k"),
    (["tune", "--slack", "0.5"], "--slack must be >= 1"),
    (["generate", "--draft", "/some/draft", "hi"], "--draft needs --target"),
    (["generate", "--target", "/t", "--method", "speculative", "hi"], "--method speculative needs a draft model"),
    (["tune", "--target", "/t"], "tune (it measures the draft too) needs a draft model"),
])
def test_cli_refuses_bad_options_in_one_line_before_loading(argv, message, no_loading, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("make", [lambda d: None, lambda d: (d / "tokenizer.json").write_text("{}")])
def test_a_directory_without_a_model_says_so(tmp_path, capsys, make):
    empty = tmp_path / "empty"
    empty.mkdir()
    make(empty)
    _, draft_dir = save_tiny_pair(tmp_path)
    assert main(["generate", "--target", str(empty), "--draft", str(draft_dir), "hi"]) == 2
    assert f"no model in '{empty}'" in capsys.readouterr().err
    from ouroboros.errors import ModelNotFoundError
    from ouroboros.loading import load_pair

    with pytest.raises(ModelNotFoundError, match="no model in"):
        load_pair(draft_dir, empty)


@pytest.mark.parametrize("method", ["vanilla", "prompt_lookup", "lookahead"])
def test_target_alone_runs_the_methods_without_a_draft(tmp_path, capsys, method):
    target_dir, _ = save_tiny_pair(tmp_path)
    assert main(["generate", "--target", str(target_dir), "--method", method, "--dtype", "float32",
                 "--max-new-tokens", "4", "hello"]) == 0
    assert f"[{method}] 4 tokens" in capsys.readouterr().err


def test_ctrl_c_stops_the_stream_with_a_partial_summary(tmp_path, capsys, monkeypatch):
    import ouroboros.generation

    real_step = ouroboros.generation.decode_step
    steps = []

    def interrupted_step(*args, **kwargs):
        steps.append(1)
        if len(steps) == 4:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(ouroboros.generation, "decode_step", interrupted_step)
    target_dir, _ = save_tiny_pair(tmp_path)
    assert main(["generate", "--target", str(target_dir), "--method", "vanilla", "--dtype", "float32",
                 "--max-new-tokens", "20", "hello"]) == 130
    err = capsys.readouterr().err
    assert "[vanilla] interrupted after 3 tokens in " in err and "tokens/s" in err


@pytest.mark.parametrize("bug", [TypeError("a bug"), RuntimeError("a bug")])
def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch, bug):
    import ouroboros.generation

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(ouroboros.generation, "generate", broken)
    target_dir, _ = save_tiny_pair(tmp_path)
    with pytest.raises(type(bug), match="a bug"):
        main(["generate", "--target", str(target_dir), "--method", "vanilla", "--dtype", "float32", "hi"])


def test_a_missing_extra_is_named_only_when_its_own_package_is_missing(capsys):
    import argparse

    from ouroboros.cli import add_optional_parser

    def missing(name):
        def load():
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return load

    parser = argparse.ArgumentParser(prog="ouroboros")
    sub = parser.add_subparsers(dest="command")
    add_optional_parser(sub, "serve", "serve", missing("fastapi.responses"))
    args = parser.parse_args(["serve", "--port", "1"])
    from ouroboros.errors import MissingExtraError

    with pytest.raises(MissingExtraError, match=r"'fastapi.responses'.*pip install \"ouroboros-decoding\[serve\]\""):
        args.func(args)
    with pytest.raises(ModuleNotFoundError, match="numpy_typo"):
        add_optional_parser(sub, "serve2", "serve", missing("numpy_typo"))


def test_version_and_help(capsys):
    from ouroboros import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"ouroboros {__version__}"
    helps = {}
    for command in ("generate", "tune", "bench"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        helps[command] = " ".join(capsys.readouterr().out.split())
    assert "speed summary" in helps["generate"] and "ouroboros tune" in helps["generate"]
    assert "decoding method (default: auto)" in helps["generate"]
    assert "speculative (the draft model's greedy chain, needs a draft)" in helps["generate"]
    assert "or at EOS (default: 128)" in helps["generate"]
    assert "fits only the built-in target" in helps["generate"]
    assert "Measure the target's and draft's forward cost" in helps["tune"]
    assert "side by side on the same prompts" in helps["bench"]


def test_config_flags_parse_as_their_fields_types(tmp_path, monkeypatch):
    """--draft-cost 0.3 reaches generate's config as 0.3: each flag parses as its field's type
    (once every non-bool flag was type=int, so no float field could be set from the command line)."""
    import ouroboros.generation
    from ouroboros.cli import build_parser

    real_generate, configs = ouroboros.generation.generate, []

    def recording(*args, config, **kwargs):
        configs.append(config)
        return real_generate(*args, config=config, **kwargs)

    monkeypatch.setattr(ouroboros.generation, "generate", recording)
    target_dir, draft_dir = save_tiny_pair(tmp_path)
    assert main(["generate", "--target", str(target_dir), "--draft", str(draft_dir), "--dtype", "float32",
                 "--method", "ouroboros", "--max-new-tokens", "4", "--draft-cost", "0.3", "--gamma", "5",
                 "hello"]) == 0
    assert configs[0].draft_cost == pytest.approx(0.3) and configs[0].gamma == 5
    args = build_parser().parse_args(["generate", "--draft-cost", "0.25", "--verify-budget", "8", "hi"])
    assert (args.draft_cost, args.verify_budget) == (0.25, 8)
    assert type(args.verify_budget) is int


@pytest.mark.parametrize("argv, message", [
    (["--draft-cost", "cheap"], "argument --draft-cost: invalid float value: 'cheap'"),
    (["--gamma", "2.5"], "argument --gamma: invalid int value: '2.5'"),
])
def test_a_config_flag_of_the_wrong_type_is_an_argparse_error(argv, message, no_loading, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", *argv, "hi"])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_draft_cost_outside_its_range_is_refused_before_loading(no_loading, capsys):
    assert main(["generate", "--draft-cost", "1", "hi"]) == 2
    assert "draft_cost must be a number in (0, 1), got 1.0" in capsys.readouterr().err
