"""The server's counters and their Prometheus rendering, in one place so that a new metric is one
field and one line."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Metrics:
    requests: dict = field(default_factory=lambda: {"completions": 0, "chat_completions": 0})
    finished: dict = field(default_factory=lambda: {"stop": 0, "length": 0, "aborted": 0, "error": 0})
    rejected: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    target_forwards: int = 0
    generation_seconds: float = 0.0
    last_tokens_per_second: float = 0.0
    pool_phrases: int = 0
    """Updated by the worker between jobs, so that a scrape never iterates the pool while it changes."""


def render_metrics(m: Metrics, waiting: int, running: int) -> str:
    """Prometheus text exposition format (version 0.0.4). A new metric is one more `metric(...)` line."""
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, samples) -> None:
        lines.extend([f"# HELP ouroboros_{name} {help}", f"# TYPE ouroboros_{name} {kind}"])
        if not isinstance(samples, dict):
            samples = {"": samples}
        for labels, value in samples.items():
            lines.append(f"ouroboros_{name}{labels} {value}")

    metric("requests_total", "counter", "Generation requests accepted into the queue, by endpoint.",
           {f'{{endpoint="{k}"}}': v for k, v in m.requests.items()})
    metric("requests_finished_total", "counter",
           "Generation requests finished, by reason (aborted: the client disconnected).",
           {f'{{reason="{k}"}}': v for k, v in m.finished.items()})
    metric("requests_rejected_total", "counter", "Requests answered with a 4xx error.", m.rejected)
    metric("prompt_tokens_total", "counter", "Prompt tokens of generated requests.", m.prompt_tokens)
    metric("generated_tokens_total", "counter", "Tokens generated.", m.generated_tokens)
    metric("target_forwards_total", "counter", "Target model forwards (verification steps).", m.target_forwards)
    metric("generation_seconds_total", "counter", "Seconds spent generating.", round(m.generation_seconds, 6))
    metric("tokens_per_second", "gauge", "Generation speed of the last finished request.",
           round(m.last_tokens_per_second, 3))
    metric("mean_accepted_tokens", "gauge", "Tokens generated per target forward since the start.",
           round(m.generated_tokens / m.target_forwards, 4) if m.target_forwards else 0)
    metric("queue_depth", "gauge", "Requests waiting for the worker.", waiting)
    metric("requests_running", "gauge", "Requests being generated (0 or 1).", running)
    metric("pool_phrases", "gauge", "Phrases in the shared phrase pool.", m.pool_phrases)
    return "\n".join(lines) + "\n"
