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
    (dict(input_ids=torch.tensor([[1, 2], [3, 4]])), ValueError, "only batch size 1"),
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
    sliding = tiny_model("qwen2", vocab=40)
    sliding.config.use_sliding_window = True
    sliding.config.sliding_window = 4
    with pytest.raises(UnsupportedModelError, match="Qwen2ForCausalLM"):
        generate(sliding, IDS, method="vanilla", max_new_tokens=2)
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
    (["generate", "--target", "/nonexistent/t", "hi"], "give both"),
    (["generate", "--dtype", "float8", "--target", "/a", "--draft", "/b", "hi"], "dtype"),
    (["generate", "   "], "prompt is empty"),
    (["generate", "--temperature", "-1", "--target", "/a", "--draft", "/b", "hi"], "temperature"),
])
def test_cli_errors_name_the_problem(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
