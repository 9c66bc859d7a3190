"""Deadline-aware admission at the ingress: refuse at once what would only time out.

Serve's own bounds (`max_ongoing_requests`, `max_queued_requests`) count requests, not
time: 32 requests queued at a model that answers one every 10 s all wait the whole request
timeout and end as 504s. The ingress keeps, per model, an in-flight limit that adapts as
TCP's congestion window and Netflix's concurrency-limits do (additive increase,
multiplicative decrease): an answer in time raises it by one, a missed deadline halves it.
A request beyond the limit is answered 503 with Retry-After at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

Outcome = Literal["answered", "late", "failed"]


@dataclass
class AdmissionLimit:
    """The in-flight limit of one model (one per model in each ingress replica)."""

    ceiling: int
    limit: float = field(init=False)
    in_flight: int = 0
    seconds_per_answer: float = 1.0  # moving average of the answers in time

    def __post_init__(self) -> None:
        self.limit = float(self.ceiling)

    def try_admit(self) -> bool:
        if self.in_flight >= int(self.limit):
            return False
        self.in_flight += 1
        return True

    def finished(self, seconds: float, outcome: Outcome) -> None:
        """Release an admitted request: `late` if it missed its deadline, `failed` for an
        answer that says nothing about the model's speed (a refusal, an error)."""
        self.in_flight -= 1
        if outcome == "answered":
            self.limit = min(float(self.ceiling), self.limit + 1)
            self.seconds_per_answer += 0.2 * (seconds - self.seconds_per_answer)
        elif outcome == "late":
            self.limit = max(1.0, self.limit / 2)

    @property
    def retry_after_s(self) -> int:
        """When a refused client may try again: about one answer's time."""
        return max(1, math.ceil(self.seconds_per_answer))
