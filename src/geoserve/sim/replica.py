"""A simulated inference replica: continuous batching as a fluid.

* **Slots.** At most ``slots`` requests hold a decode slot; the rest wait FIFO in
  the engine's queue (its ``queue_depth`` signal).
* **Prefill.** A request that gets a slot is prefilled by the replica's single
  prefill server, FIFO, for ``prefill_ms(uncached prompt tokens)``; uncached is
  what the replica's own prefix cache does not hold at that moment. (Prefill does
  not slow the decoders down: chunked-prefill interference is not modelled.)
* **Decode.** Every decoding request advances one token per step, and a step takes
  ``tpot_ms(batch)`` for the current batch: processor sharing at a batch-dependent
  rate. A virtual clock ``V`` counts the tokens every decoder has produced since the
  replica started; a request joining at ``V0`` finishes at ``V0 + output_tokens``,
  so the next completion is the heap minimum and each event costs O(log batch).
  The first token comes one step after prefill ends.
* **Prefix cache.** An LRU of block hashes with the replica's KV capacity
  (``kv_blocks x kv_block_tokens`` tokens); a prompt's leading blocks that are
  present are not prefilled. Cached blocks of finished requests stay until evicted
  (vLLM's and SGLang's behaviour); KV held by in-flight requests is not subtracted.
* **Faults.** ``fail_all`` empties the replica (an outage); ``slow`` multiplies every
  duration (a brownout).
"""

from __future__ import annotations

import heapq
from collections import deque

from .latency import LatencyModel


class Replica:
    __slots__ = (
        "index", "region", "slots", "latency", "cache", "cache_blocks", "alive", "slow", "waiting", "in_use",
        "prefill_free_at", "decoding", "virtual", "virtual_at", "batch", "version", "busy_since", "busy_ms",
        "last_signal_ms", "block_tokens", "served", "seq", "prefilling", "uses", "clock",
    )

    def __init__(self, index: int, region: int, slots: int, latency: LatencyModel, cache_tokens: int, block_tokens: int) -> None:
        self.index = index
        self.region = region
        self.slots = slots
        self.latency = latency
        self.block_tokens = block_tokens
        # LRU of block hashes: block -> last use stamp, and a FIFO of (stamp, block)
        # uses in which a block's stale entries are skipped when it is evicted
        self.cache: dict = {}
        self.uses: deque = deque()
        self.clock = 0
        self.cache_blocks = max(1, cache_tokens // block_tokens)
        self.alive = True
        self.slow = 1.0
        self.waiting: deque = deque()
        self.in_use = 0
        self.prefill_free_at = 0.0
        self.decoding: list = []  # heap of (finish virtual time, seq, request)
        self.virtual = 0.0
        self.virtual_at = 0.0
        self.batch = 0
        self.version = 0
        self.busy_since = -1.0
        self.busy_ms = 0.0
        self.last_signal_ms = 0.0
        self.served = 0
        self.seq = 0
        self.prefilling: dict = {}  # request id -> request, between slot and first token

    # ---------------------------------------------------------------- arrivals
    def admit(self, req, now: float) -> float:
        """Take a request; returns its prefill end time, or -1 if it waits for a slot."""
        if self.in_use < self.slots:
            return self._start(req, now)
        self.waiting.append(req)
        return -1.0

    def _start(self, req, now: float) -> float:
        if self.in_use == 0:
            self.busy_since = now
        self.in_use += 1
        self.prefilling[req.id] = req
        cached = self._cache_lookup(req)
        req.cached_tokens = cached
        begin = now if now > self.prefill_free_at else self.prefill_free_at
        end = begin + self.latency.prefill_ms(req.prompt_tokens - cached) * self.slow
        self.prefill_free_at = end
        return end

    def _cache_lookup(self, req) -> int:
        """Leading blocks of the prompt already cached; then every block is most recent."""
        cache, uses = self.cache, self.uses
        blocks = req.blocks
        hits = 0
        for h in blocks:
            if h in cache:
                hits += 1
            else:
                break
        self.clock += 1
        stamp = self.clock
        for h in blocks:
            cache[h] = stamp
        uses.append((stamp, blocks))
        if len(cache) > self.cache_blocks:
            self._evict()
        return min(hits * req.block_tokens, req.prompt_tokens)

    def _evict(self) -> None:
        cache, uses = self.cache, self.uses
        while len(cache) > self.cache_blocks and uses:
            stamp, blocks = uses.popleft()
            for h in blocks:
                if cache.get(h) == stamp:  # not used since: least recently used
                    del cache[h]

    # ---------------------------------------------------------------- decode
    def step_ms(self, batch: int) -> float:
        return self.latency.tpot_ms(batch) * self.slow

    def _advance(self, now: float) -> None:
        if self.batch:
            self.virtual += (now - self.virtual_at) / self.step_ms(self.batch)
        self.virtual_at = now

    def join_decode(self, req, now: float) -> float:
        """Prefill done: the request decodes; returns its first-token time."""
        del self.prefilling[req.id]
        self._advance(now)
        self.batch += 1
        self.seq += 1
        heapq.heappush(self.decoding, (self.virtual + (req.output_cap or req.output_tokens), self.seq, req))
        return now + self.step_ms(self.batch)

    def next_completion(self) -> float:
        """When the next decoder finishes at the current rate (bumps the version)."""
        self.version += 1
        if not self.decoding:
            return -1.0
        finish = self.decoding[0][0]
        return self.virtual_at + max(0.0, finish - self.virtual) * self.step_ms(self.batch)

    def finish_due(self, now: float) -> list:
        """Pop the decoders that are done by ``now``; free their slots."""
        self._advance(now)
        done = []
        while self.decoding and self.decoding[0][0] <= self.virtual + 1e-9:
            done.append(heapq.heappop(self.decoding)[2])
        self.batch -= len(done)
        self.in_use -= len(done)
        self.served += len(done)
        if self.in_use == 0 and self.busy_since >= 0:
            self.busy_ms += now - self.busy_since
            self.busy_since = -1.0
        return done

    def start_waiting(self, now: float) -> list:
        """Give free slots to waiting requests: [(request, prefill end)]."""
        started = []
        while self.waiting and self.in_use < self.slots:
            req = self.waiting.popleft()
            started.append((req, self._start(req, now)))
        return started

    # ---------------------------------------------------------------- faults
    def set_slow(self, factor: float, now: float) -> None:
        self._advance(now)
        self.slow = factor

    def fail_all(self, now: float) -> list:
        """An outage: every request here is dropped; the replica comes back empty and cold."""
        # in request-id order: the outcome must not depend on container internals
        dropped = sorted([*self.waiting, *self.prefilling.values(), *(entry[2] for entry in self.decoding)], key=lambda q: q.id)
        self.waiting.clear()
        self.prefilling.clear()
        self.decoding = []
        self.batch = 0
        self.version += 1
        self.virtual_at = now
        if self.busy_since >= 0:
            self.busy_ms += now - self.busy_since
            self.busy_since = -1.0
        self.in_use = 0
        self.prefill_free_at = now
        self.cache.clear()
        self.uses.clear()
        return dropped

    def signals(self, now: float) -> tuple[int, int]:
        """(running, waiting) as a vLLM scheduler reports them: a request whose prefill
        has not started is still waiting (it does not fit the step's token budget)."""
        backlog = len(self.prefilling) - (1 if self.prefilling and self.prefill_started(now) else 0)
        return self.in_use - backlog, len(self.waiting) + backlog

    def prefill_started(self, now: float) -> bool:
        # the server is FIFO: something is prefilling unless it sits idle until prefill_free_at
        return self.prefill_free_at > now

    def busy_until(self, now: float) -> float:
        """Busy time so far, counting the open interval."""
        return self.busy_ms + (now - self.busy_since if self.busy_since >= 0 else 0.0)
