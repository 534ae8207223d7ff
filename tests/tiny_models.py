"""Tiny random models and a byte-level tokenizer, built from configs in the tests (no downloads)."""

from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def tiny_model(arch: str = "llama", seed: int = 0, vocab: int = 97, layers: int = 2, hidden: int = 32,
               eos_token_id=None, context: int = 1024):
    """A random fp32 causal LM; seed fixes the weights."""
    config_cls, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                        eos_token_id=eos_token_id, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    model = model_cls(config).eval()
    model.generation_config.eos_token_id = eos_token_id
    return model


FAMILIES = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "query_pre_attn_scalar": 8}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "query_pre_attn_scalar": 8}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
}
"""Families users bring: (config class, model class, extra config fields) in `transformers`."""


def tiny_family_model(family: str, seed: int = 0, vocab: int = 97, window: int | None = None, layers: int = 2,
                      hidden: int = 32):
    """A random fp32 model of `family` (a FAMILIES key); with `window`, its sliding-window layers
    attend to that many positions: every layer for Mistral and Phi-3, the first of two layers for
    Gemma 2/3 (the second is full attention), the second for Qwen2/3 (use_sliding_window). Without
    it, Mistral and Phi-3 have none and Gemma keeps its default (4096, more than the tests use)."""
    config_name, model_name, extra = FAMILIES[family]
    fields = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=1024, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None, tie_word_embeddings=False, **extra)
    if family != "gpt_neox":
        fields["num_key_value_heads"] = 2
    if window is not None:
        fields["sliding_window"] = window
        if family in ("gemma2", "gemma3"):
            fields["layer_types"] = ["sliding_attention", "full_attention"] * (layers // 2)
        elif family in ("qwen2", "qwen3"):
            fields.update(use_sliding_window=True, max_window_layers=layers // 2)
        elif family not in ("mistral", "phi3"):
            raise ValueError(f"{family} has no sliding-window layers")
    elif family in ("mistral", "phi3"):
        fields["sliding_window"] = None
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**fields)).eval()
    model.generation_config.eos_token_id = None
    return model


def perturbed(model, scale: float = 0.02, seed: int = 1):
    """A copy of `model` with small noise on every weight: a draft that mostly agrees."""
    copy = type(model)(model.config).eval()
    copy.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale * p.std().clamp(min=1e-3))
    copy.generation_config.eos_token_id = model.generation_config.eos_token_id
    return copy


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 256 byte tokens then the chat specials (vocab 259)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=SPECIALS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_pair(directory, arch: str = "qwen2", seed: int = 0):
    """Save a target and a perturbed draft (sharing the tiny tokenizer) under directory/target and
    directory/draft, loadable with from_pretrained; returns the two paths."""
    tokenizer = tiny_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    target = tiny_model(arch, seed=seed, vocab=len(tokenizer), eos_token_id=eos, hidden=64)
    draft = perturbed(target, scale=0.05, seed=seed + 1)
    paths = []
    for name, model in (("target", target), ("draft", draft)):
        path = directory / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


class Runners(list):
    """The runners generate() built, through the engines `engine` gives it: each made by `build(model,
    role)` (injected, so a test chooses the runner without patching the library)."""

    def __init__(self, build):
        super().__init__()
        self.build = build

    def make(self, model, fast=None, role="target", subset=None):
        assert subset is None, "an injected runner is built without an output subset (tiny vocabularies get none)"
        self.append(self.build(model, role))
        return self[-1]

    def engine(self, target, draft=None):
        from ouroboros.engine import Engine

        return Engine(target, draft, fast=False, make_runner=self.make)
