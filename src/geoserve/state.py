"""RouterState: what a router remembers between snapshots, in typed arrays.

* ``pending[r]`` - requests routed to replica r since the snapshot of ``epoch``
  and not yet completed. A snapshot's signals already count what was routed
  before it, so the counters belong to one epoch: the first ``route()`` against a
  newer snapshot starts them from zero, and a ``complete()`` of an older epoch's
  decision releases nothing. Between two snapshots a burst therefore sees its own
  earlier picks and spreads instead of herding onto the replica that looked idle.
* ``pending_prefill_ms[r]`` - the predicted prefill of those requests: work the
  engine has not started, as far as the router knows, and that a later request to
  r waits behind (its FIFO); epoch-scoped like ``pending``.
* ``prefill_until_ms[r]`` - when the prefills this router sent to r are predicted
  to be done, on the snapshots' clock (each starts at the later of its snapshot's
  time and the previous one's end: r's FIFO prefill as far as this router fed it).
  Not epoch-scoped: a long prefill sent just before a snapshot is still running
  after it, and the engine's signals count it as running, not as waiting, so
  only this carries its remaining time across the snapshot.
* ``prefill_ewma_ms[r]`` - a running mean (weight 1/16) of the prefills this router
  predicted for what it sent to r (NaN before the first): what one request waiting
  in r's queue costs while r has free slots (the queue is then prefill backlog).
  Not epoch-scoped: it is an estimate, not a count.
* ``spill_pair`` / ``spill_total`` - overflow admitted since that snapshot, per
  (origin region, rescuer) and per rescuer, spent against the snapshot's spill
  allowance; epoch-scoped like ``pending``.
* ``queued[g]`` - requests the router told to wait (action ``queue``) in region g
  and not yet completed; bounded by the region's decode slots.
* The approximate prefix index: an open-addressing table of ``entries`` block
  hashes (linear probing over ``PROBE`` slots), each with up to ``WAYS`` replicas
  that were recently sent that block, stamped with a logical clock; a full probe
  window evicts its least recently stamped entry, a full owner set its oldest
  owner. Bounded memory, like SGLang's approximate radix tree and llm-d's
  per-endpoint LRU, with no per-request allocation.

Decisions only read this object; ``Router.route`` and ``Router.complete`` change
it, under ``lock``.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["RouterState", "PROBE", "WAYS", "PREFIX_ENTRY", "STATE_ARRAYS"]

PROBE = 4
WAYS = 4
# One prefix-index entry is one 64-byte cache line (the kernel's PrefixEntry struct):
# a probe touches one line, not one in each of three arrays.
PREFIX_ENTRY = np.dtype([("key", "<u8"), ("owner", "<i4", (WAYS,)), ("stamp", "<u8", (WAYS,)), ("pad", "u1", (8,))])
assert PREFIX_ENTRY.itemsize == 64
# Every array a RouterState holds (copy(), tests that compare two states).
STATE_ARRAYS = ("pending", "pending_prefill_ms", "prefill_until_ms", "prefill_ewma_ms", "spill_pair", "spill_total", "queued", "prefix", "clock")
EWMA_WEIGHT = 1.0 / 16.0  # of the newest prefill in prefill_ewma_ms


class RouterState:
    def __init__(self, n_replicas: int, n_regions: int, prefix_entries: int = 1 << 16,
                 prefix_table: "np.ndarray | None" = None) -> None:
        """``prefix_table``: adopt an existing prefix index (a membership change keeps
        its 4 MB table and remaps the owners in place instead of copying it)."""
        if prefix_table is not None:
            prefix_entries = len(prefix_table)
        if prefix_entries < 16 or prefix_entries & (prefix_entries - 1):
            raise ValueError("prefix_entries must be a power of two >= 16")
        self.n_replicas = n_replicas
        self.n_regions = n_regions
        self.epoch = -1
        self.pending = np.zeros(n_replicas, dtype=np.int32)
        self.pending_prefill_ms = np.zeros(n_replicas, dtype=np.float64)
        self.prefill_until_ms = np.full(n_replicas, -np.inf, dtype=np.float64)
        self.prefill_ewma_ms = np.full(n_replicas, np.nan, dtype=np.float64)
        self.spill_pair = np.zeros(n_regions * n_regions, dtype=np.int32)
        self.spill_total = np.zeros(n_regions, dtype=np.int32)
        self.queued = np.zeros(n_regions, dtype=np.int32)
        if prefix_table is not None:
            if prefix_table.dtype != PREFIX_ENTRY:
                raise ValueError("prefix_table must be a PREFIX_ENTRY array")
            self.prefix = prefix_table
        else:
            self.prefix = np.zeros(prefix_entries, dtype=PREFIX_ENTRY)
            self.prefix["owner"] = -1
        self.clock = np.zeros(1, dtype=np.uint64)
        self.lock = threading.Lock()
        self._native: object = None  # the kernel's pointer view, built on first use

    @classmethod
    def for_fleet(cls, fleet) -> "RouterState":  # noqa: ANN001 (Fleet; avoids an import cycle)
        return cls(fleet.n_replicas, fleet.n_regions, fleet.policy.prefix_index_entries)

    def roll(self, epoch: int) -> None:
        """Start the epoch-scoped counters afresh when a newer snapshot arrives."""
        if epoch != self.epoch:
            self.pending.fill(0)
            self.pending_prefill_ms.fill(0.0)
            self.spill_pair.fill(0)
            self.spill_total.fill(0)
            self.epoch = epoch

    # Field views of the prefix table (what the twin and tests read).
    @property
    def prefix_keys(self) -> np.ndarray:
        return self.prefix["key"]

    @property
    def prefix_owner(self) -> np.ndarray:
        return self.prefix["owner"]

    @property
    def prefix_stamp(self) -> np.ndarray:
        return self.prefix["stamp"]

    def copy(self) -> "RouterState":
        """An independent copy (for what-if decisions and tests)."""
        other = RouterState(self.n_replicas, self.n_regions, len(self.prefix))
        other.epoch = self.epoch
        for name in STATE_ARRAYS:
            getattr(other, name)[...] = getattr(self, name)
        return other

    def same_as(self, other: "RouterState") -> bool:
        """Equal epoch and arrays (tests hold the kernel and its twin to this)."""
        return self.epoch == other.epoch and all(
            np.array_equal(getattr(self, n).view(np.uint8), getattr(other, n).view(np.uint8)) for n in STATE_ARRAYS
        )
