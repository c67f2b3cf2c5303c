"""A retry budget: retries may be at most a share of the requests in flight.

Envoy's semantics: a retry is allowed while active retries stay below
``max(min_concurrency, budget_share x active requests)`` (defaults 20 % and 3), so
retries can never multiply load during an incident the way per-request retry
counts do. Retries never go to the same replica: the caller passes the replicas
tried in ``Request.exclude``.
"""

from __future__ import annotations

__all__ = ["RetryBudget"]


class RetryBudget:
    __slots__ = ("budget_share", "min_concurrency", "active_requests", "active_retries", "allowed", "refused")

    def __init__(self, budget_share: float = 0.2, min_concurrency: int = 3) -> None:
        if not 0 <= budget_share <= 1 or min_concurrency < 0:
            raise ValueError("budget_share in [0, 1], min_concurrency >= 0")
        self.budget_share = budget_share
        self.min_concurrency = min_concurrency
        self.active_requests = 0
        self.active_retries = 0
        self.allowed = 0
        self.refused = 0

    def begin_request(self) -> None:
        self.active_requests += 1

    def end_request(self) -> None:
        self.active_requests = max(0, self.active_requests - 1)

    def try_retry(self) -> bool:
        """Take a retry slot if the budget has one (release it with end_retry)."""
        limit = max(self.min_concurrency, self.budget_share * self.active_requests)
        if self.active_retries < limit:
            self.active_retries += 1
            self.allowed += 1
            return True
        self.refused += 1
        return False

    def end_retry(self) -> None:
        self.active_retries = max(0, self.active_retries - 1)
