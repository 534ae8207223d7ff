"""Loading a target/draft pair from local paths (or the built-in default pair) and checking that
they share one tokenizer, so that token ids mean the same thing to both models."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .default_pair import DEFAULT_PAIR, Converter, PairSpec, default_pair_dirs, transformers_progress
from .errors import InvalidArgumentError, ModelNotFoundError

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


COPY_SOURCE = "ouroboros-source.json"
"""In a `stored_as` copy: the size and mtime of each weight file it was made from, so a source
converted again is copied again."""


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidArgumentError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def check_same_tokenizer(target_tokenizer, draft_tokenizer) -> None:
    """Raise ValueError naming the first difference between the two tokenizers' vocabularies."""
    a, b = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if a != b:
        only_a = sorted(set(a) - set(b))[:3]
        only_b = sorted(set(b) - set(a))[:3]
        moved = sorted(t for t in set(a) & set(b) if a[t] != b[t])[:3]
        raise InvalidArgumentError(
            f"the target and draft tokenizers differ (target {len(a)} tokens, draft {len(b)}; "
            f"only in target: {only_a}, only in draft: {only_b}, different ids: {moved}): "
            "speculative decoding needs one shared tokenizer")


def load_pair(target: str | os.PathLike | None = None, draft: str | os.PathLike | None = None, *,
              dtype: str | torch.dtype = "bfloat16", device: str = "cpu", progress: bool = True):
    """(target, draft, tokenizer) from local model directories, or the built-in pair when both are
    None; a target alone gives draft None (for the methods that need no draft). Models are in eval
    mode with sdpa attention (needed for tree masks)."""
    if target is None and draft is not None:
        raise InvalidArgumentError("a draft path needs a target path too: give both, or neither for the built-in pair")
    if target is None:
        return load_default_pair(dtype, progress=progress, device=device)
    return load_dirs(target, draft, dtype=dtype, device=device, progress=progress)


def load_default_pair(dtype: str | torch.dtype = torch.bfloat16, cache_dir: str | os.PathLike | None = None,
                      progress: bool = True, *, device: str = "cpu", spec: PairSpec = DEFAULT_PAIR,
                      converter: Converter | None = None):
    """(target, draft, tokenizer) of the built-in pair (converted on first use), through the same
    loader and checks as any other pair. `spec` and `converter` let tests use small fake parts."""
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    target, draft = default_pair_dirs(cache_dir, progress, spec=spec, converter=converter)
    target, draft = (stored_as(path, dtype, progress) for path in (target, draft))
    return load_dirs(target, draft, dtype=dtype, device=device, progress=progress)


def stored_as(directory: str | os.PathLike, dtype: torch.dtype, progress: bool = False) -> Path:
    """`directory`'s model with its weights stored in `dtype`: `directory` itself when they already
    are, else a sibling folder `<name>-<dtype>` written once.

    Why: loading float32 files in bf16 keeps every float32 page of the file mapped until the load
    ends (measured: 10.8 GB peak RSS for the built-in 1.5B target, whose bf16 weights are 3.6 GB),
    while files already in bf16 are memory-mapped as they are (1.4 s instead of 9 s to load). The
    copy is written tensor by tensor (one float32 tensor in memory at a time) into a temporary
    folder that is renamed into place when complete, so an interrupted copy is never used."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    directory = Path(directory)
    name = str(dtype).removeprefix("torch.")
    if _stored_dtype(directory) in (None, name):
        return directory
    copy = directory.with_name(f"{directory.name}-{name}")
    source = {item.name: [item.stat().st_size, item.stat().st_mtime_ns] for item in directory.glob("*.safetensors")}
    try:
        if _stored_dtype(copy) == name and json.loads((copy / COPY_SOURCE).read_text()) == source:
            return copy
    except (OSError, ValueError):
        pass  # absent or unreadable: made anew below
    if progress:
        print(f"ouroboros: storing {directory.name} in {name} once (faster loading, half the memory) ...",
              file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(prefix=f".{copy.name}.tmp-", dir=directory.parent))
    try:
        for item in directory.iterdir():
            if item.suffix == ".safetensors":
                with safe_open(item, "pt") as f:
                    keys = list(f.keys())
                tensors = {}
                for key in keys:  # reopened per tensor: its float32 pages are unmapped right after
                    with safe_open(item, "pt") as f:
                        tensors[key] = f.get_tensor(key).to(dtype)
                save_file(tensors, work / item.name, metadata={"format": "pt"})
                del tensors
            elif item.name == "config.json":
                config = json.loads(item.read_text())
                config["dtype"] = name
                (work / item.name).write_text(json.dumps(config, indent=2) + "\n")
            elif item.is_file():
                shutil.copy2(item, work / item.name)
        (work / COPY_SOURCE).write_text(json.dumps(source))
        shutil.rmtree(copy, ignore_errors=True)
        os.replace(work, copy)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return copy


def _stored_dtype(directory: Path) -> str | None:
    """The dtype a model folder's config says its weights are stored in; None when it is not a
    complete model folder or does not say."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not any(directory.glob("*.safetensors")):
        return None
    return config.get("dtype") or config.get("torch_dtype")


def check_model_dir(role: str, path: str | os.PathLike) -> None:
    """Refuse a path that holds no model, before a tokenizer error would blame a missing package."""
    if not os.path.isdir(path):
        raise ModelNotFoundError(f"{role} model directory not found: {os.fspath(path)!r}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelNotFoundError(f"no model in {os.fspath(path)!r}: the {role} directory has no config.json")


def load_dirs(target: str | os.PathLike, draft: str | os.PathLike | None, *, dtype: str | torch.dtype,
              device: str, progress: bool):
    """The one loader: checks both directories and the shared tokenizer, then loads each model with
    sdpa attention in eval mode. `draft=None` loads the target alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    paths = [target] if draft is None else [target, draft]
    for role, path in zip(("target", "draft"), paths):
        check_model_dir(role, path)
    with transformers_progress(progress):
        tokenizer = AutoTokenizer.from_pretrained(target)
        if draft is not None:
            check_same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(draft))
        models = [AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
                  for path in paths]
    return models[0], (models[1] if draft is not None else None), tokenizer
