"""Action and reason codes shared by the kernels, their twins and the router.

The Cython kernel declares the same numbers in its ``cdef enum``; a test pins
them together.
"""

SERVE, OVERFLOW, QUEUE, DEGRADE, SHED = range(5)
ACTION_NAMES = ("serve", "overflow", "queue", "degrade", "shed")

(
    R_AFFINITY,
    R_LEAST_TTFT,
    R_LOCAL_DEGRADED,
    R_SPILL_AFFINITY,
    R_SPILL_LEAST_TTFT,
    R_WAIT_FOR_SLOT,
    R_FALLBACK_MODEL,
    R_NO_REPLICA,
    R_QUEUE_FULL,
    R_OVER_BUDGET,
) = range(10)
REASON_NAMES = (
    "affinity",
    "least_ttft",
    "local_degraded",
    "spill_affinity",
    "spill_least_ttft",
    "wait_for_slot",
    "fallback_model",
    "no_replica",
    "queue_full",
    "over_budget",
)
