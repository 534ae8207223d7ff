"""Device check for `ouroboros tune`: forward costs of models shaped like the built-in pair (random
weights, bf16) on CUDA, the sizes the cost model picks from them, and a generation with those sizes
that must equal HF greedy on a tiny fp32 pair. Run: python scripts/cuda_sizing.py

Random weights make the draft's acceptance meaningless, so it is set (0.9, the real pair's draft
agrees with its target on ~94% of HumanEval tokens); the costs do not depend on the weights."""

import argparse
import sys
from pathlib import Path

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

from ouroboros import OuroborosConfig, generate
from ouroboros.sizing import choose, measure

SHAPES = {  # Qwen2.5-Coder-1.5B / -0.5B
    "target": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12),
    "draft": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14),
}


def shaped_model(shape: dict):
    config = Qwen2Config(vocab_size=151936, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, attn_implementation="sdpa", **shape)
    return Qwen2ForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tiny_models lives with the tests
    from tiny_models import perturbed, tiny_model

    print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())
    tokens = (1, 2, 4, 8, 16, 32, 64)
    curves = {role: measure(shaped_model(shape), tokens=tokens, repeats=5) for role, shape in SHAPES.items()}
    sizing = choose(curves["target"], curves["draft"], acceptance=0.9)
    print(sizing.report())
    target = tiny_model("qwen2", seed=0, vocab=61, hidden=64)
    draft = perturbed(target, 0.05).cuda()
    target = target.cuda()
    ids = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(0)).cuda()
    ref = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=48, pad_token_id=0)
    config = OuroborosConfig(**{**sizing.config.to_dict(), "level": 4})
    out = generate(target, ids, draft=draft, method="ouroboros", max_new_tokens=48, eos_token_id=[], config=config)
    exact = torch.equal(out.sequences, ref)
    print(f"tuned config on tiny fp32 pair: exact={exact} mean accepted {out.stats.mean_accepted:.2f}")
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
