"""Engine load signals: Prometheus ``/metrics`` of vLLM and SGLang -> ReplicaSignal.

``pip install "geoserve[signals]"`` (prometheus_client). The text is parsed with
``prometheus_client``'s own parser, not by hand. What is read:

| signal | vLLM (V0 and V1 names) | SGLang |
|---|---|---|
| ``in_flight`` | ``vllm:num_requests_running`` | ``sglang:num_running_reqs`` |
| ``queue_depth`` | ``vllm:num_requests_waiting`` | ``sglang:num_queue_reqs`` |
| KV usage (0..1) | ``vllm:kv_cache_usage_perc`` (V1), ``vllm:gpu_cache_usage_perc`` (V0) | ``sglang:token_usage`` |
| ``tpot_ms`` (step time) | ``vllm:time_per_output_token_seconds`` (histogram) | ``sglang:time_per_output_token_seconds`` |

Only the lines of the families read go to the parser (their ``# HELP`` / ``# TYPE``
lines and samples; of a histogram, ``_sum`` and ``_count``, not the buckets): an
engine's ``/metrics`` is mostly other families, and the parser's time is the
poller's, on the picker's interpreter, every poll.

A series repeated with the same labels counts once (the last value); series that
differ by label (vLLM V1's ``engine="<i>"`` under data parallelism) are summed for
the counts and averaged for KV usage; ``model`` filters on ``model_name``.
Missing metrics or unparsable text raise :class:`geoserve.SignalError`.

:class:`MetricsPoller` scrapes many replicas at once with a timeout each; a replica
that does not answer is a failed probe in a :class:`~geoserve.resilience.FleetHealth`
(so one lost scrape does not drop it: hysteresis), and keeps its last good load,
observed when it was good, so it turns ``stale`` in the snapshot if it stays silent.
The step time is a histogram, cumulative since the engine started: the poller
reports the mean over its last interval (the change of ``_sum`` over the change of
``_count``, once at least ``min_tokens`` tokens were generated in it; none
otherwise), which is what a slowed replica shows first.
"""

from __future__ import annotations

import math
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Optional

import msgspec

from ..errors import SignalError
from ..resilience.health import FleetHealth
from ..types import ReplicaSignal, Signals

__all__ = ["EngineLoad", "parse_metrics", "to_signal", "step_ms", "MetricsPoller", "ENGINES"]

ENGINES = {
    "vllm": {
        "running": ("vllm:num_requests_running",),
        "waiting": ("vllm:num_requests_waiting",),
        "kv_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        "tpot": ("vllm:time_per_output_token_seconds",),
    },
    "sglang": {
        "running": ("sglang:num_running_reqs",),
        "waiting": ("sglang:num_queue_reqs",),
        "kv_usage": ("sglang:token_usage",),
        "tpot": ("sglang:time_per_output_token_seconds",),
    },
}


class EngineLoad(msgspec.Struct, frozen=True):
    engine: str
    running: int
    waiting: int
    kv_usage: Optional[float] = None  # 0..1, None when the engine did not say
    # the step-time histogram's running totals (seconds, tokens), None when absent
    tpot_sum_s: Optional[float] = None
    tpot_count: Optional[float] = None


_NAMES = "|".join(re.escape(name) for fields in ENGINES.values() for names in fields.values() for name in names)
# a line of a family read: its HELP or TYPE comment, or a sample of it (a histogram's _sum or _count)
_READ_LINES = re.compile(rf"^(?:# (?:HELP|TYPE) (?:{_NAMES})[ \t].*|(?:{_NAMES})(?:_sum|_count)?[{{ \t].*)$", re.M)


def _samples(text: str) -> dict[str, dict[tuple, float]]:
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:  # pragma: no cover - the [signals] extra
        raise ImportError("engine signals need the [signals] extra: pip install 'geoserve[signals]'") from None
    out: dict[str, dict[tuple, float]] = {}
    try:
        for family in text_string_to_metric_families("\n".join(_READ_LINES.findall(text)) + "\n"):
            for sample in family.samples:
                out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    except (ValueError, TypeError, IndexError) as err:
        raise SignalError("<metrics>", f"not Prometheus text: {err}") from None
    return out


def parse_metrics(text: str, engine: str = "auto", model: Optional[str] = None) -> EngineLoad:
    """The load an engine reports in its /metrics text."""
    samples = _samples(text)
    if engine == "auto":
        engine = next((e for e, names in ENGINES.items() if names["running"][0] in samples), "")
        if not engine:
            raise SignalError("<metrics>", "neither vLLM nor SGLang metrics found")
    if engine not in ENGINES:
        raise SignalError("engine", f"unknown engine {engine!r} (known: {', '.join(ENGINES)})")

    def values(field: str, suffix: str = "") -> list[float]:
        for name in ENGINES[engine][field]:
            name += suffix
            series = samples.get(name)
            if series is None:
                continue
            picked = [v for labels, v in series.items() if model is None or dict(labels).get("model_name") == model]
            if picked:
                for v in picked:
                    if not math.isfinite(v) or v < 0:
                        raise SignalError(field, f"{name} is {v!r}")
                return picked
        return []

    running, waiting, kv = values("running"), values("waiting"), values("kv_usage")
    if not running or not waiting:
        missing = ENGINES[engine]["running" if not running else "waiting"][0]
        raise SignalError("running" if not running else "waiting", f"{missing} is missing" + (f" for model {model!r}" if model else ""))
    tpot_sum, tpot_count = values("tpot", "_sum"), values("tpot", "_count")
    return EngineLoad(engine, int(round(sum(running))), int(round(sum(waiting))), (sum(kv) / len(kv)) if kv else None,
                      sum(tpot_sum) if tpot_sum and tpot_count else None, sum(tpot_count) if tpot_sum and tpot_count else None)


def to_signal(replica: str, load: EngineLoad, observed_ms: float, kv_blocks: Optional[int] = None,
              tpot_ms: Optional[float] = None) -> ReplicaSignal:
    """A ReplicaSignal from an engine's load (free KV blocks when the capacity is
    known; ``tpot_ms``: the step time over the last interval, when measured)."""
    free = None
    if load.kv_usage is not None and kv_blocks is not None:
        free = max(0, int(round((1.0 - min(1.0, load.kv_usage)) * kv_blocks)))
    return ReplicaSignal(replica=replica, observed_ms=observed_ms, in_flight=load.running,
                         queue_depth=load.waiting, kv_free_blocks=free, tpot_ms=tpot_ms)


def step_ms(before: Optional[tuple[float, float]], now: EngineLoad, min_tokens: float) -> Optional[float]:
    """The mean step time between two scrapes of the step-time histogram (ms), or
    None: no histogram, too few tokens in between, or a restarted engine."""
    if before is None or now.tpot_sum_s is None or now.tpot_count is None:
        return None
    tokens, seconds = now.tpot_count - before[1], now.tpot_sum_s - before[0]
    if tokens < min_tokens or seconds < 0:
        return None
    return seconds / tokens * 1000.0


class MetricsPoller:
    """Scrape every replica's /metrics concurrently, each with a timeout."""

    def __init__(self, targets: Mapping[str, str], *, engine: str = "auto", timeout_s: float = 0.5,
                 health: Optional[FleetHealth] = None, kv_blocks: Optional[Mapping[str, int]] = None,
                 model: Optional[str] = None, workers: int = 16,
                 health_urls: Optional[Mapping[str, str]] = None, min_tokens: int = 16) -> None:
        self.targets = dict(targets)  # replica id -> metrics URL
        # replica id -> liveness URL (vLLM's and SGLang's /health): a replica whose
        # metrics answer but whose health check fails (an engine that errors every
        # request) is a failed probe too
        self.health_urls = dict(health_urls or {})
        self.engine = engine
        self.timeout_s = timeout_s
        self.health = health
        self.kv_blocks = dict(kv_blocks or {})
        self.model = model
        self.last: dict[str, ReplicaSignal] = {}
        self.steps: dict[str, tuple[float, float]] = {}  # the step-time histogram's last totals (s, tokens)
        self.min_tokens = min_tokens
        self.errors: dict[str, str] = {}
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="geoserve-metrics")

    def _fetch(self, url: str) -> str:
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:  # noqa: S310 (operator-given URLs)
                return response.read(4 << 20).decode("utf-8", "replace")
        except urllib.error.HTTPError as err:  # a non-2xx answer: a failed probe; free its connection
            err.close()
            raise

    def poll(self, now_ms: float) -> Signals:
        """One round: fresh signals for the replicas that answered; the last good one
        (aging towards ``stale``) for those that did not; probes into ``health``."""
        futures = {rid: self.pool.submit(self._fetch, url) for rid, url in self.targets.items()}
        checks = {rid: self.pool.submit(self._fetch, url) for rid, url in self.health_urls.items()}
        for rid, future in futures.items():
            try:
                load = parse_metrics(future.result(), self.engine, self.model)
                if rid in checks:
                    checks[rid].result()  # raises HTTPError (an OSError) on a non-2xx answer
            except (OSError, SignalError, ValueError) as err:
                self.errors[rid] = f"{type(err).__name__}: {err}"
                ok = False
            else:
                self.errors.pop(rid, None)
                tpot = step_ms(self.steps.get(rid), load, self.min_tokens)
                if load.tpot_count is not None and (tpot is not None or rid not in self.steps
                                                    or load.tpot_count < self.steps[rid][1]):
                    self.steps[rid] = (load.tpot_sum_s, load.tpot_count)  # the next window starts here
                self.last[rid] = to_signal(rid, load, now_ms, self.kv_blocks.get(rid), tpot)
                ok = True
            if self.health is not None and rid in self.health.replicas:
                self.health.probe(rid, ok, now_ms)
        signals = Signals(now_ms=now_ms, replicas=tuple(self.last.values()))
        return self.health.apply(signals) if self.health is not None else signals

    def close(self) -> None:
        self.pool.shutdown(wait=True)
