"""A request's text as it is generated: streamed as soon as it is final, cut at stop strings, and
the result it ends with; shared by the one-at-a-time worker and the batched loop."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


class TextTracker:
    """A transformers-style streamer that turns new token ids into text as soon as it is final.

    Text is final once it cannot change: no trailing half of a multi-byte character (decoded as
    U+FFFD until the rest arrives) and no tail that could still grow into a stop string. A stop
    string cuts the text where it begins and sets `stopped`, which ends generation.
    """

    def __init__(self, decode, stop: list[str], on_text=None):
        self._decode, self._stop, self._on_text = decode, stop, on_text
        self._ids: list[int] = []
        self._prompt_seen = False
        self.text = ""
        self.sent = 0
        self.stopped = False
        self.first_token_at: float | None = None
        """`time.monotonic()` when the first generated token arrived."""

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        if self.first_token_at is None and value.numel():
            self.first_token_at = time.monotonic()
        if self.stopped:
            return
        self._ids += value.reshape(-1).tolist()
        self.text = self._decode(self._ids)
        cut = min((i for i in (self.text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True
            self._send(cut)
        else:
            self._send(self._final_end())

    def end(self) -> None:
        """Nothing to do: the caller flushes with `finish` once it knows why generation ended."""

    def finish(self) -> None:
        self._send(len(self.text))

    def _final_end(self) -> int:
        end = len(self.text.rstrip("\ufffd"))
        held = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, end), held, -1):
                if self.text.endswith(s[:k], 0, end):
                    held = k
                    break
        return end - held

    def _send(self, end: int) -> None:
        if end > self.sent:
            if self._on_text is not None:
                self._on_text(self.text[self.sent:end])
            self.sent = end


@dataclass
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}
