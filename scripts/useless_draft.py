"""Write a draft model that costs as much as the built-in draft but almost never agrees with the
target: the built-in draft with the rows of its output layer permuted (issue 10's "useless draft").

    python scripts/useless_draft.py OUT_DIR
    ouroboros bench --target ~/.cache/ouroboros-decoding/qwen2.5-coder-1.5b-instruct-q4km-v1 --draft OUT_DIR ...
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ouroboros.default_pair import default_pair_dirs


def main(out: str) -> None:
    target_dir, draft_dir = default_pair_dirs()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32)
    head = draft.get_output_embeddings().weight.detach().clone()
    permutation = torch.randperm(head.shape[0], generator=torch.Generator().manual_seed(0))
    draft.config.tie_word_embeddings = False  # permute the output rows only, not the input embedding
    draft.lm_head = torch.nn.Linear(head.shape[1], head.shape[0], bias=False)
    draft.lm_head.weight = torch.nn.Parameter(head[permutation])
    draft.save_pretrained(out)
    AutoTokenizer.from_pretrained(draft_dir).save_pretrained(out)
    print(f"useless draft written to {out}; its target: {target_dir}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", metavar="OUT_DIR", help="where the useless draft is written")
    main(parser.parse_args().out)
