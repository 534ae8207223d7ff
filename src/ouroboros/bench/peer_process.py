"""A peer engine of the bench in its own process: the bench's side of the protocol `peer_worker.py`
describes, shared by the vLLM and the llama.cpp peers. A peer's worker is started once per run
(startup is not timed as part of any prompt) under its own Python and asked one prompt at a time
(with vLLM and `bench --batch N`, N prompts in one call), so that it is interleaved with the other
methods like any contestant."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import InvalidArgumentError, OuroborosError


class PeerError(OuroborosError):
    """A peer's worker could not start or answer; the message says why and where its log is."""


def executable_python(given: str, flag: str) -> str:
    """`given` (a peer's Python, from `flag`) if it is an executable file."""
    if not os.access(given, os.X_OK):
        raise InvalidArgumentError(f"{flag} {given!r} is not an executable Python")
    return given


class PeerProcess:
    """One peer engine in a worker process; `generate` is one request of one or several prompts."""

    engine = "peer"
    """The engine's name in messages (e.g. "vLLM")."""
    error: type[PeerError] = PeerError
    """What a failure raises."""

    def __init__(self, python: str, worker: Path, settings: dict, log_path: Path, env: dict[str, str],
                 progress: bool = True, what: str = ""):
        self.log_path = log_path
        if progress:
            print(f"ouroboros bench: starting {self.engine}{f' ({what})' if what else ''} in {python}; "
                  f"log: {log_path}", file=sys.stderr, flush=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w")
        self.process = subprocess.Popen([python, str(worker)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self._log, text=True, env=env)
        ready = self._ask(settings)
        self.version = ready.get("version", "?")
        self.startup_seconds = ready.get("startup_seconds")

    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int], temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None) -> tuple[list[list[int]], float]:
        """(new token ids per prompt, seconds the worker took to answer all of them, prefill included)."""
        reply = self._ask({"prompts": prompts, "max_new_tokens": max_new_tokens, "eos_ids": eos_ids,
                           "temperature": temperature, "top_p": top_p, "seed": seed})
        return reply["rows"], reply["seconds"]

    def describe(self) -> dict:
        """What results.json records of this peer: version, startup time and settings."""
        return {"version": self.version, "startup_seconds": self.startup_seconds}

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
            raise self.error(f"{self.engine} worker failed: {reply['error']} (log: {self.log_path})")
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


@contextlib.contextmanager
def started(makers: dict[str, Callable[[], PeerProcess]]):
    """{name: peer} for each maker, each started once for the whole run and ended when the run ends,
    whatever happens."""
    peers = {}
    try:
        for name, make in makers.items():
            peers[name] = make()
        yield peers
    finally:
        for peer in peers.values():
            peer.close()


def peer_settings(peers: dict[str, PeerProcess]) -> dict:
    """What results.json records of each peer (`PeerProcess.describe`)."""
    return {name: peer.describe() for name, peer in peers.items()}
