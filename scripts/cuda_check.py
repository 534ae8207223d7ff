"""Device check: every method is exact on CUDA (fp32 tiny models), also with the draft on another
device, and seeded sampling is reproducible. Run: python scripts/cuda_check.py"""

import argparse
import sys
from pathlib import Path

import torch
import transformers

from ouroboros import METHODS, generate


def main() -> int:
    argparse.ArgumentParser(description=__doc__).parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tiny_models lives with the tests
    from tiny_models import perturbed, tiny_model

    assert torch.cuda.is_available(), "no CUDA device"
    print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())
    failures = 0
    for arch in ("llama", "qwen2"):
        target = tiny_model(arch, seed=0, vocab=61, hidden=64)
        drafts = {"perturbed-cuda": perturbed(target, 0.05).cuda(), "perturbed-cpu": perturbed(target, 0.05)}
        target = target.cuda()
        for seed in range(3):
            ids = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(seed)).cuda()
            ref = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=48,
                                  pad_token_id=0)
            for name, draft in drafts.items():
                for method in METHODS:
                    out = generate(target, ids, draft=draft, method=method, max_new_tokens=48, eos_token_id=[])
                    ok = torch.equal(out.sequences, ref)
                    failures += not ok
                    print(f"{arch} seed={seed} draft={name:15s} {method:14s} exact={ok} "
                          f"accepted/forward={out.stats.mean_accepted:.2f}")
        a, b = (generate(target, ids, draft=drafts["perturbed-cuda"], max_new_tokens=32, eos_token_id=[],
                         do_sample=True, temperature=0.8, top_p=0.9, seed=7).sequences for _ in range(2))
        failures += not torch.equal(a, b)
        print(f"{arch} sampling reproducible={torch.equal(a, b)}")
    print("FAILURES", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
