"""llama.cpp as a peer in the bench, the way vLLM is one (`vllm_peer`): llama-cpp-python runs in a
worker process (`llama_worker.py`; the process plumbing is `peer_process`) under a Python that has it
(`--llama-python`), started once per run and asked one prompt at a time, interleaved with the other
methods.

llama.cpp reads GGUF files: for the built-in pair, the very Q4_K_M files the pair is published as
(`default_pair.gguf_file`, joined once into the cache folder); for another pair, `--llama-gguf`.
This package converts those weights to bf16 and runs that, so llama.cpp runs a different numeric
model: its greedy text is its own and is not compared with hf_vanilla's (`Method.compared`); only
its speed is comparable."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import default_pair
from ..errors import InvalidArgumentError
from .peer_process import PeerError, PeerProcess, executable_python

WORKER = Path(__file__).with_name("llama_worker.py")
MODES = {"llama_cpp": None, "llama_cpp_lookup": "lookup", "llama_cpp_draft": "draft"}
"""Each llama.cpp contestant's drafter (None: plain decoding)."""
DEFAULT_DRAFT_TOKENS = 4
"""llama_cpp_draft's draft length: the same k as the vLLM peers' default."""
LOOKUP = (2, 10)
"""llama_cpp_lookup's n-gram size and draft length: the binding's own defaults
(`LlamaPromptLookupDecoding(max_ngram_size=2, num_pred_tokens=10)`)."""
NUMERIC_MODEL = ("llama.cpp runs the GGUF's quantized (e.g. Q4_K_M) weights, a different numeric model from the "
                 "one the other methods run (e.g. bf16): its text is its own and is not compared with hf_vanilla's; "
                 "only its speed is comparable")


class LlamaError(PeerError):
    """The llama.cpp worker could not start or answer."""


@dataclass(frozen=True)
class LlamaSettings:
    python: str
    target: str
    """The target's GGUF file."""
    draft: str | None
    """The draft's GGUF file, for mode "draft"."""
    n_ctx: int
    threads: int
    mode: str | None = None
    """`MODES`' drafter; None: plain decoding."""
    draft_tokens: int = DEFAULT_DRAFT_TOKENS
    lookup_ngram: int = LOOKUP[0]
    lookup_tokens: int = LOOKUP[1]


class LlamaPeer(PeerProcess):
    """One llama.cpp model (with its drafter) in a worker process."""

    engine = "llama.cpp"
    error = LlamaError

    def __init__(self, settings: LlamaSettings, log_path: Path, progress: bool = True):
        self.settings = settings
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the worker imports only llama_cpp and the standard library
        super().__init__(settings.python, WORKER, asdict(settings), log_path, env, progress,
                         what=settings.mode or "plain")

    def describe(self) -> dict:
        s = self.settings
        drafts = {"draft": s.draft_tokens, "lookup": s.lookup_tokens}.get(s.mode)
        return {**super().describe(), "python": s.python, "gguf": s.target,
                "draft_gguf": s.draft if s.mode == "draft" else None, "mode": s.mode, "num_draft_tokens": drafts,
                "lookup_ngram": s.lookup_ngram if s.mode == "lookup" else None, "n_ctx": s.n_ctx,
                "threads": s.threads, "numeric_model": NUMERIC_MODEL}


def llama_python(given: str | None) -> str | None:
    """The Python that runs llama.cpp: `given` (--llama-python), else None (the peers are off)."""
    return executable_python(given, "--llama-python") if given else None


def gguf_files(names: list[str], given: str | None, builtin: bool, cache: Path | None = None) -> tuple[str, str | None]:
    """(target GGUF, draft GGUF or None) for the llama.cpp contestants in `names`: `given` ("T[,D]",
    --llama-gguf), else the built-in pair's own files when the bench runs it, else an error."""
    needs_draft = "llama_cpp_draft" in names
    if given:
        files = [part.strip() for part in given.split(",")]
        if len(files) > 2 or not all(files):
            raise InvalidArgumentError(f"--llama-gguf takes TARGET.gguf[,DRAFT.gguf], got {given!r}")
        for file in files:
            if not Path(file).is_file():
                raise InvalidArgumentError(f"--llama-gguf: no file {file!r}")
        if needs_draft and len(files) < 2:
            raise InvalidArgumentError("llama_cpp_draft needs the draft's GGUF too: "
                                       "--llama-gguf TARGET.gguf,DRAFT.gguf")
        return files[0], files[1] if len(files) > 1 else None
    if not builtin:
        raise InvalidArgumentError(f"{', '.join(names)} run GGUF files: with --target give --llama-gguf "
                                   "TARGET.gguf[,DRAFT.gguf] (the same model in GGUF), or leave the llama.cpp "
                                   "methods out")
    return (str(builtin_gguf("target", cache)), str(builtin_gguf("draft", cache)) if needs_draft else None)


def builtin_gguf(role: str, cache: Path | None = None) -> Path:
    """The built-in pair's `role` model as its published GGUF, joined (and checked) once into the
    cache folder's gguf/ and reused by later runs; a file there is complete (it is moved into place
    only once joined and checked)."""
    model = default_pair.DEFAULT_PAIR.target if role == "target" else default_pair.DEFAULT_PAIR.draft
    folder = (cache or default_pair.default_cache_dir()) / "gguf"
    path = folder / f"{model.dir_name}.gguf"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        print(f"ouroboros bench: joining the built-in {role}'s GGUF for llama.cpp into {path} (once)",
              file=sys.stderr, flush=True)
        partial = folder / f".{model.dir_name}.gguf.{os.getpid()}.tmp"
        try:
            default_pair.gguf_file(role, partial)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    return path


def llama_makers(names: list[str], python: str | None, gguf: str | None, *, builtin: bool, n_ctx: int,
                threads: int, draft_tokens: int, log_dir: Path, cache: Path | None = None) -> dict:
    """{name: a function that starts its LlamaPeer} for the llama.cpp contestants in `names`."""
    if not names:
        return {}
    if python is None:
        raise InvalidArgumentError(f"{', '.join(names)} need llama.cpp: give --llama-python, a Python with "
                                   "llama-cpp-python (e.g. python3 -m venv V && V/bin/pip install "
                                   "llama-cpp-python==0.3.36)")
    target, draft = gguf_files(names, gguf, builtin, cache)

    def maker(name: str):
        settings = LlamaSettings(python, target, draft, n_ctx, threads, MODES[name], draft_tokens)
        return lambda: LlamaPeer(settings, log_dir / f"{name}.log")

    return {name: maker(name) for name in names}

