"""The server's counters and their Prometheus rendering, in one place so that a new metric is one
field and one line."""

from __future__ import annotations

from dataclasses import dataclass, field

FIRST_TOKEN_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Upper bounds (seconds) of the time-to-first-token histogram's buckets."""


@dataclass
class Histogram:
    """A Prometheus histogram: counts per upper bound (cumulative when rendered), sum and count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.bounds)
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        self.total += value
        self.count += 1

    def samples(self) -> dict[str, float]:
        """`_bucket{le=...}` (cumulative, +Inf last), `_sum` and `_count`, by name suffix and labels."""
        out, running = {}, 0
        for bound, count in zip(self.bounds, self.counts or [0] * len(self.bounds)):
            running += count
            out[f'_bucket{{le="{bound:g}"}}'] = running
        out['_bucket{le="+Inf"}'] = self.count
        out["_sum"] = round(self.total, 6)
        out["_count"] = self.count
        return out


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
    auto_steps: dict = field(default_factory=dict)
    """method="auto": decoding steps per arm (vanilla, prompt_lookup, ouroboros)."""
    auto_events: dict = field(default_factory=lambda: {"probes": 0, "fallbacks": 0, "switches": 0})
    auto_plans: dict = field(default_factory=dict)
    """method="auto": how often each arm was the plan's start."""
    draft_trunks: dict = field(default_factory=lambda: {"full": 0, "partial": 0})
    """Draft-model trunks the target accepted whole or in part (the draft's acceptance)."""
    batch_steps: int = 0
    batch_rows: int = 0
    """--max-batch > 1: batched steps, and the rows they decoded (summed over steps)."""
    handoffs: int = 0
    """--max-batch > 1: requests that ran alone (the batch was empty) and joined it when others came."""
    first_token: Histogram = field(default_factory=lambda: Histogram(FIRST_TOKEN_BUCKETS))
    """Seconds from a request's arrival in the queue to its first generated token (queue wait and
    prefill included)."""

    def count_events(self, events: dict, plan_start: str) -> None:
        """Add one generation's acceptance and auto counters."""
        for name, count in events.items():
            if name.startswith("auto_") and name.endswith("_steps"):
                arm = name.removeprefix("auto_").removesuffix("_steps")
                self.auto_steps[arm] = self.auto_steps.get(arm, 0) + count
            elif name.removeprefix("auto_") in self.auto_events:
                self.auto_events[name.removeprefix("auto_")] += count
            elif name.removeprefix("trunk_") in self.draft_trunks:
                self.draft_trunks[name.removeprefix("trunk_")] += count
        if plan_start:
            self.auto_plans[plan_start] = self.auto_plans.get(plan_start, 0) + 1


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
    metric("requests_running", "gauge", "Requests being generated (up to --max-batch).", running)
    metric("batch_steps_total", "counter", "Batched decoding steps (--max-batch > 1).", m.batch_steps)
    metric("batch_rows_total", "counter", "Requests decoded by the batched steps, summed over steps.", m.batch_rows)
    metric("batch_handoffs_total", "counter",
           "Requests that started alone on the single-stream loop and joined the batch when others arrived.",
           m.handoffs)
    metric("time_to_first_token_seconds", "histogram",
           "Seconds from a request's arrival to its first generated token (queue and prefill included).",
           m.first_token.samples())
    metric("pool_phrases", "gauge", "Phrases in the shared phrase pool.", m.pool_phrases)
    metric("draft_trunks_total", "counter", "Draft-model trunks accepted whole or in part by the target.",
           {f'{{result="{k}"}}': v for k, v in m.draft_trunks.items()})
    metric("auto_plans_total", "counter", 'method="auto": the arm each generation started with.',
           {f'{{arm="{k}"}}': v for k, v in sorted(m.auto_plans.items())} or 0)
    metric("auto_steps_total", "counter", 'method="auto": decoding steps run by each arm.',
           {f'{{arm="{k}"}}': v for k, v in sorted(m.auto_steps.items())} or 0)
    metric("auto_events_total", "counter",
           'method="auto": probes of other arms, fallbacks to plain decoding, other switches.',
           {f'{{event="{k}"}}': v for k, v in m.auto_events.items()})
    return "\n".join(lines) + "\n"
