# cython: language_level=3
"""The routing decision, compiled: the twin of ``geoserve/_twin/decide.py``.

Same algorithm, same order of float operations (built with -ffp-contract=off), so
both give identical decisions; the differential tests hold them to it. The scan
runs in ``noexcept nogil`` functions over raw pointers that two view classes take
once - ``SnapshotView`` per snapshot, ``StateView`` per router state - because
acquiring a dozen memoryviews per call would cost more than the scan.
"""

cimport numpy as cnp
from libc.math cimport ceil, floor, INFINITY, NAN, isnan
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc

from .common cimport XXH3_64bits, mix64, prefetch

cnp.import_array()

cdef enum:
    R_AFFINITY = 0
    R_LEAST_TTFT = 1
    R_LOCAL_DEGRADED = 2
    R_SPILL_AFFINITY = 3
    R_SPILL_LEAST_TTFT = 4
    R_WAIT_FOR_SLOT = 5
    R_FALLBACK_MODEL = 6
    R_NO_REPLICA = 7
    R_QUEUE_FULL = 8
    R_OVER_BUDGET = 9

cdef enum:
    PROBE = 4
    WAYS = 4
    MAX_REGIONS = 64

# Exported so that a test can pin them to geoserve._codes and geoserve.state.
CODES = dict(SERVE=SERVE, OVERFLOW=OVERFLOW, QUEUE=QUEUE, DEGRADE=DEGRADE, SHED=SHED,
             R_AFFINITY=R_AFFINITY, R_LEAST_TTFT=R_LEAST_TTFT, R_LOCAL_DEGRADED=R_LOCAL_DEGRADED,
             R_SPILL_AFFINITY=R_SPILL_AFFINITY, R_SPILL_LEAST_TTFT=R_SPILL_LEAST_TTFT,
             R_WAIT_FOR_SLOT=R_WAIT_FOR_SLOT, R_FALLBACK_MODEL=R_FALLBACK_MODEL,
             R_NO_REPLICA=R_NO_REPLICA, R_QUEUE_FULL=R_QUEUE_FULL, R_OVER_BUDGET=R_OVER_BUDGET,
             PROBE=PROBE, WAYS=WAYS)


cdef struct FleetC:
    int n_regions
    int n_locations
    const double* rtt_ms
    const int32_t* home
    const int32_t* replica_region
    const int32_t* replica_version
    const int32_t* decode_slots
    const double* prefill_base_ms
    const double* model_prefill_base_ms
    const double* model_prefill_ms_per_token
    const int32_t* model_start
    const int32_t* group_start
    const int32_t* fallback_model
    const int32_t* region_slots
    const uint64_t* ring_points
    const int32_t* ring_owner
    const int32_t* ring_start
    const double* class_local_budget_ms
    const double* class_cross_budget_ms
    const double* class_slot_ceiling
    const double* class_spill_reserve
    const int64_t* class_degrade_max_tokens
    double load_bound
    double spill_ceiling
    double inference_share_ms
    int max_fallbacks
    int64_t min_retry_after_ms
    int64_t default_retry_after_ms


cdef struct Row:
    # What the scan reads of one replica, packed into one cache line at view build
    # (copied from the snapshot's columns: the twin reads the same numbers there).
    double slot_ms
    double prefill_base_ms
    double prefill_ms_per_token
    double tpot_base_ms
    double tpot_ms_per_batch
    int32_t in_flight
    int32_t queue_depth
    int32_t decode_slots
    int32_t region
    int32_t version
    uint8_t usable  # status ok or degraded, and region up
    uint8_t degraded  # soft failure: a candidate only when no healthy replica will do


cdef struct SnapC:
    int64_t epoch
    double now_ms
    bint any_degraded
    Row* rows
    const uint8_t* status
    const uint8_t* region_up
    const int32_t* in_flight
    const int32_t* queue_depth
    const double* prefill_ms_per_token
    const double* tpot_base_ms
    const double* tpot_ms_per_batch
    const double* slot_ms
    const double* spill_pair
    const double* spill_total


cdef struct PrefixEntry:
    # One 64-byte line; the layout of geoserve.state.PREFIX_ENTRY.
    uint64_t key
    int32_t owner[WAYS]
    uint64_t stamp[WAYS]
    uint8_t pad[8]


cdef struct StateC:
    int32_t* pending
    double* pending_prefill_ms
    double* prefill_until_ms
    double* prefill_ewma_ms
    int32_t* spill_pair
    int32_t* spill_total
    int32_t* queued
    PrefixEntry* prefix
    uint64_t* clock
    uint64_t mask


cdef struct ModelC:
    # One pass over one model's replicas (the twin's _Model).
    const FleetC* f
    const SnapC* s
    const StateC* st
    const ReqC* req
    int model
    int version
    int first
    int last
    bint live
    bint healthy_only  # the first pass when some replica is degraded (_choose)
    # Replicas with leading prefix blocks in the index, and how many: only owners of
    # block 0 can have any, so there are at most WAYS (a twin's dict, as an array).
    int n_match
    int32_t match_replica[WAYS]
    int32_t match_blocks[WAYS]


cdef uint64_t _EMPTY = 0


cdef void* _ptr(object arr, int typenum, str name) except NULL:
    # typenum -1: the structured prefix table (checked by itemsize and by the caller).
    if type(arr) is not cnp.ndarray or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>arr):
        raise TypeError(f"{name} must be a C-contiguous array")
    if typenum >= 0 and cnp.PyArray_TYPE(<cnp.ndarray>arr) != typenum:
        raise TypeError(f"{name} has the wrong dtype")
    if cnp.PyArray_SIZE(<cnp.ndarray>arr) == 0:
        # A valid, never-dereferenced address for empty tables.
        return <void*>&_EMPTY
    return cnp.PyArray_DATA(<cnp.ndarray>arr)




cdef struct DefaultsC:  # the profile's values derive_columns keeps where a measured column has none
    const int32_t* kv_blocks
    const double* prefill_ms_per_token
    const double* tpot_base_ms
    const double* tpot_ms_per_batch
    const double* service_ms
    const double* service_basis_ms
    const double* service_batch
    double max_age_ms


cdef class FleetView:
    """Raw pointers into a Fleet's tables, built once per fleet (cached on it) and
    copied into every snapshot's view. Keeps the arrays, not the fleet, alive."""
    cdef FleetC f
    cdef DefaultsC d
    cdef tuple unmeasured  # the fleet's shared columns of a round that measures nothing
    cdef tuple arrays

    def __cinit__(self, fleet):
        if fleet.n_regions > MAX_REGIONS:
            raise ValueError(f"the compiled kernel handles at most {MAX_REGIONS} regions")
        cdef int f64 = cnp.NPY_FLOAT64, i32 = cnp.NPY_INT32, u64 = cnp.NPY_UINT64
        self.arrays = (fleet.rtt_ms, fleet.home, fleet.replica_region, fleet.replica_version, fleet.decode_slots,
                       fleet.prefill_base_ms, fleet.model_prefill_base_ms, fleet.model_prefill_ms_per_token,
                       fleet.model_start, fleet.group_start, fleet.fallback_model, fleet.region_slots,
                       fleet.ring_points, fleet.ring_owner, fleet.ring_start, fleet.class_local_budget_ms,
                       fleet.class_cross_budget_ms, fleet.class_slot_ceiling, fleet.class_spill_reserve,
                       fleet.class_degrade_max_tokens, fleet.kv_blocks, fleet.default_prefill_ms_per_token,
                       fleet.default_tpot_base_ms, fleet.default_tpot_ms_per_batch, fleet.default_service_ms,
                       fleet.service_basis_ms, fleet.service_batch)
        self.unmeasured = fleet.unmeasured
        self.d.kv_blocks = <int32_t*>_ptr(fleet.kv_blocks, i32, "kv_blocks")
        self.d.prefill_ms_per_token = <double*>_ptr(fleet.default_prefill_ms_per_token, f64, "default_prefill_ms_per_token")
        self.d.tpot_base_ms = <double*>_ptr(fleet.default_tpot_base_ms, f64, "default_tpot_base_ms")
        self.d.tpot_ms_per_batch = <double*>_ptr(fleet.default_tpot_ms_per_batch, f64, "default_tpot_ms_per_batch")
        self.d.service_ms = <double*>_ptr(fleet.default_service_ms, f64, "default_service_ms")
        self.d.service_basis_ms = <double*>_ptr(fleet.service_basis_ms, f64, "service_basis_ms")
        self.d.service_batch = <double*>_ptr(fleet.service_batch, f64, "service_batch")
        self.d.max_age_ms = fleet.policy.signal_max_age_ms
        self.f.n_regions = fleet.n_regions
        self.f.n_locations = len(fleet.locations)
        self.f.rtt_ms = <double*>_ptr(fleet.rtt_ms, f64, "rtt_ms")
        self.f.home = <int32_t*>_ptr(fleet.home, i32, "home")
        self.f.replica_region = <int32_t*>_ptr(fleet.replica_region, i32, "replica_region")
        self.f.replica_version = <int32_t*>_ptr(fleet.replica_version, i32, "replica_version")
        self.f.decode_slots = <int32_t*>_ptr(fleet.decode_slots, i32, "decode_slots")
        self.f.prefill_base_ms = <double*>_ptr(fleet.prefill_base_ms, f64, "prefill_base_ms")
        self.f.model_prefill_base_ms = <double*>_ptr(fleet.model_prefill_base_ms, f64, "model_prefill_base_ms")
        self.f.model_prefill_ms_per_token = <double*>_ptr(fleet.model_prefill_ms_per_token, f64, "model_prefill_ms_per_token")
        self.f.model_start = <int32_t*>_ptr(fleet.model_start, i32, "model_start")
        self.f.group_start = <int32_t*>_ptr(fleet.group_start, i32, "group_start")
        self.f.fallback_model = <int32_t*>_ptr(fleet.fallback_model, i32, "fallback_model")
        self.f.region_slots = <int32_t*>_ptr(fleet.region_slots, i32, "region_slots")
        self.f.ring_points = <uint64_t*>_ptr(fleet.ring_points, u64, "ring_points")
        self.f.ring_owner = <int32_t*>_ptr(fleet.ring_owner, i32, "ring_owner")
        self.f.ring_start = <int32_t*>_ptr(fleet.ring_start, i32, "ring_start")
        self.f.class_local_budget_ms = <double*>_ptr(fleet.class_local_budget_ms, f64, "class_local_budget_ms")
        self.f.class_cross_budget_ms = <double*>_ptr(fleet.class_cross_budget_ms, f64, "class_cross_budget_ms")
        self.f.class_slot_ceiling = <double*>_ptr(fleet.class_slot_ceiling, f64, "class_slot_ceiling")
        self.f.class_spill_reserve = <double*>_ptr(fleet.class_spill_reserve, f64, "class_spill_reserve")
        self.f.class_degrade_max_tokens = <int64_t*>_ptr(fleet.class_degrade_max_tokens, cnp.NPY_INT64,
                                                         "class_degrade_max_tokens")
        p = fleet.policy
        self.f.load_bound = p.load_bound
        self.f.spill_ceiling = p.spill_ceiling
        self.f.inference_share_ms = p.inference_share_ms
        self.f.max_fallbacks = p.max_fallbacks
        self.f.min_retry_after_ms = p.min_retry_after_ms
        self.f.default_retry_after_ms = p.default_retry_after_ms


cdef inline FleetView _fleet_view(object fleet):
    cdef object view = fleet._native
    if view is None:
        view = FleetView(fleet)
        fleet._native = view
    return <FleetView>view


cdef class SnapshotView:
    """Raw pointers into a Snapshot and its Fleet. It keeps the arrays alive, not the
    snapshot (which holds the view): no reference cycle, so a snapshot is freed as
    soon as the last caller drops it."""
    cdef FleetC f
    cdef SnapC s
    cdef object fleet
    cdef tuple arrays

    def __cinit__(self, snapshot):
        cdef FleetView fv = _fleet_view(snapshot.fleet)
        self.fleet = fv  # keeps the fleet's arrays alive
        self.f = fv.f
        self.arrays = (snapshot.status, snapshot.region_up, snapshot.in_flight, snapshot.queue_depth,
                       snapshot.prefill_ms_per_token, snapshot.tpot_base_ms, snapshot.tpot_ms_per_batch,
                       snapshot.slot_ms, snapshot.spill_pair, snapshot.spill_total)
        cdef int f64 = cnp.NPY_FLOAT64, i32 = cnp.NPY_INT32, u8 = cnp.NPY_UINT8
        self.s.epoch = snapshot.epoch
        self.s.any_degraded = False  # set while packing the rows
        self.s.now_ms = snapshot.now_ms
        self.s.status = <uint8_t*>_ptr(self.arrays[0], u8, "status")
        self.s.region_up = <uint8_t*>_ptr(self.arrays[1], u8, "region_up")
        self.s.in_flight = <int32_t*>_ptr(self.arrays[2], i32, "in_flight")
        self.s.queue_depth = <int32_t*>_ptr(self.arrays[3], i32, "queue_depth")
        self.s.prefill_ms_per_token = <double*>_ptr(self.arrays[4], f64, "prefill_ms_per_token")
        self.s.tpot_base_ms = <double*>_ptr(self.arrays[5], f64, "tpot_base_ms")
        self.s.tpot_ms_per_batch = <double*>_ptr(self.arrays[6], f64, "tpot_ms_per_batch")
        self.s.slot_ms = <double*>_ptr(self.arrays[7], f64, "slot_ms")
        self.s.spill_pair = <double*>_ptr(self.arrays[8], f64, "spill_pair")
        self.s.spill_total = <double*>_ptr(self.arrays[9], f64, "spill_total")
        self._pack(snapshot.fleet.n_replicas)

    cdef int _pack(self, Py_ssize_t n) except -1:
        cdef Py_ssize_t r
        cdef Row* row
        self.s.rows = <Row*>malloc((n + 1) * sizeof(Row))
        if self.s.rows == NULL:
            raise MemoryError()
        for r in range(n):
            row = &self.s.rows[r]
            row.slot_ms = self.s.slot_ms[r]
            row.prefill_base_ms = self.f.prefill_base_ms[r]
            row.prefill_ms_per_token = self.s.prefill_ms_per_token[r]
            row.tpot_base_ms = self.s.tpot_base_ms[r]
            row.tpot_ms_per_batch = self.s.tpot_ms_per_batch[r]
            row.in_flight = self.s.in_flight[r]
            row.queue_depth = self.s.queue_depth[r]
            row.decode_slots = self.f.decode_slots[r]
            row.region = self.f.replica_region[r]
            row.version = self.f.replica_version[r]
            row.usable = (self.s.status[r] == 0 or self.s.status[r] == 5) and self.s.region_up[row.region] != 0
            row.degraded = self.s.status[r] == 5
            if row.degraded:
                self.s.any_degraded = True
        return 0

    def __dealloc__(self):
        free(self.s.rows)


cdef class StateView:
    """Raw pointers into a RouterState's arrays; keeps the arrays (not the state) alive."""
    cdef StateC st
    cdef tuple arrays

    def __cinit__(self, state):
        self.arrays = (state.pending, state.pending_prefill_ms, state.prefill_until_ms, state.prefill_ewma_ms, state.spill_pair, state.spill_total, state.queued, state.prefix, state.clock)
        cdef int i32 = cnp.NPY_INT32, u64 = cnp.NPY_UINT64
        self.st.pending = <int32_t*>_ptr(state.pending, i32, "pending")
        self.st.pending_prefill_ms = <double*>_ptr(state.pending_prefill_ms, cnp.NPY_FLOAT64, "pending_prefill_ms")
        self.st.prefill_until_ms = <double*>_ptr(state.prefill_until_ms, cnp.NPY_FLOAT64, "prefill_until_ms")
        self.st.prefill_ewma_ms = <double*>_ptr(state.prefill_ewma_ms, cnp.NPY_FLOAT64, "prefill_ewma_ms")
        self.st.spill_pair = <int32_t*>_ptr(state.spill_pair, i32, "spill_pair")
        self.st.spill_total = <int32_t*>_ptr(state.spill_total, i32, "spill_total")
        self.st.queued = <int32_t*>_ptr(state.queued, i32, "queued")
        from geoserve.state import PREFIX_ENTRY
        if sizeof(PrefixEntry) != 64 or PREFIX_ENTRY.itemsize != 64:
            raise TypeError("prefix table layout mismatch")
        if state.prefix.dtype != PREFIX_ENTRY:
            raise TypeError("prefix must be a PREFIX_ENTRY table")
        self.st.prefix = <PrefixEntry*>_ptr(state.prefix, -1, "prefix")
        self.st.clock = <uint64_t*>_ptr(state.clock, u64, "clock")
        self.st.mask = <uint64_t>(len(state.prefix) - 1)


cdef inline SnapshotView _snapshot_view(object snapshot):
    cdef object view = snapshot._native
    if view is None:
        view = SnapshotView(snapshot)
        snapshot._native = view
    return <SnapshotView>view


cdef inline StateView _state_view(object state):
    cdef object view = state._native
    if view is None:
        view = StateView(state)
        state._native = view
    return <StateView>view


# ------------------------------------------------------------- snapshot columns
cdef inline object _col(object values, Py_ssize_t n, int typenum):
    """The column as a C-contiguous 1-d array of exactly ``typenum`` and length n, else None."""
    if type(values) is not cnp.ndarray:
        return None
    cdef cnp.ndarray arr = <cnp.ndarray>values
    if (cnp.PyArray_NDIM(arr) != 1 or cnp.PyArray_DIM(arr, 0) != n or cnp.PyArray_TYPE(arr) != typenum
            or not cnp.PyArray_IS_C_CONTIGUOUS(arr)):
        return None
    return arr


cdef inline bint _override_ok(double v, bint positive) noexcept nogil:
    """NaN (keep the profile) or a finite number >= 0 (> 0 when ``positive``)."""
    return isnan(v) or (v - v == 0.0 and v >= 0.0 and (v > 0.0 or not positive))


def derive_columns(fleet, double now_ms, c):
    """The compiled twin of ``snapshot.derive_columns`` for the common dtypes
    (float64 times and overrides, int32 counts, bool flags, C-contiguous, or None):
    the same tuple, or None when a column has another dtype or shape or any value
    is invalid - the reference then validates it and names the error."""
    cdef Py_ssize_t n = fleet.n_replicas, r
    cdef int f64 = cnp.NPY_FLOAT64, i32 = cnp.NPY_INT32, b1 = cnp.NPY_BOOL
    observed_a = _col(c.observed_ms, n, f64)
    in_flight_a = _col(c.in_flight, n, i32)
    queue_a = _col(c.queue_depth, n, i32)
    if observed_a is None or in_flight_a is None or queue_a is None:
        return None
    cdef list given = [c.healthy, c.draining, c.degraded, c.kv_free_blocks, c.prefill_ms_per_token, c.tpot_ms,
                       c.mean_service_ms]
    cdef int k
    for k in range(7):
        if given[k] is not None:
            given[k] = _col(given[k], n, b1 if k < 3 else (i32 if k == 3 else f64))
            if given[k] is None:
                return None
    cdef const double* observed = <const double*>cnp.PyArray_DATA(observed_a)
    cdef const int32_t* in_flight = <const int32_t*>cnp.PyArray_DATA(in_flight_a)
    cdef const int32_t* queue = <const int32_t*>cnp.PyArray_DATA(queue_a)
    cdef const uint8_t* healthy = NULL if given[0] is None else <const uint8_t*>cnp.PyArray_DATA(given[0])
    cdef const uint8_t* draining = NULL if given[1] is None else <const uint8_t*>cnp.PyArray_DATA(given[1])
    cdef const uint8_t* degraded = NULL if given[2] is None else <const uint8_t*>cnp.PyArray_DATA(given[2])
    cdef const int32_t* kv = NULL if given[3] is None else <const int32_t*>cnp.PyArray_DATA(given[3])
    cdef const double* prefill = NULL if given[4] is None else <const double*>cnp.PyArray_DATA(given[4])
    cdef const double* tpot = NULL if given[5] is None else <const double*>cnp.PyArray_DATA(given[5])
    cdef const double* service = NULL if given[6] is None else <const double*>cnp.PyArray_DATA(given[6])
    cdef FleetView fv
    try:
        fv = _fleet_view(fleet)  # the fleet's tables, resolved once per fleet
    except ValueError:  # a fleet the kernels do not take (too many regions)
        return None
    cdef const int32_t* kv_default = fv.d.kv_blocks
    cdef const double* prefill_default = fv.d.prefill_ms_per_token
    cdef const double* tpot_default = fv.d.tpot_base_ms
    cdef const double* batch_default = fv.d.tpot_ms_per_batch
    cdef const double* service_default = fv.d.service_ms
    cdef const int32_t* slots = fv.f.decode_slots
    cdef const double* prefill_base = fv.f.prefill_base_ms
    cdef const double* service_batch = fv.d.service_batch
    cdef const double* service_basis = fv.d.service_basis_ms
    cdef double max_age = fv.d.max_age_ms
    cdef cnp.npy_intp dims = n
    # nothing measured (no KV, rate, step or service column): the fleet's shared
    # unmeasured columns, as the reference; only status and counts are new
    cdef bint unmeasured = given[3] is None and given[4] is None and given[5] is None and given[6] is None
    cdef tuple out = (cnp.PyArray_EMPTY(1, &dims, cnp.NPY_UINT8, 0), cnp.PyArray_EMPTY(1, &dims, i32, 0),
                      cnp.PyArray_EMPTY(1, &dims, i32, 0))
    if unmeasured:
        out = out + fv.unmeasured
    else:
        out = out + (cnp.PyArray_EMPTY(1, &dims, i32, 0), cnp.PyArray_EMPTY(1, &dims, f64, 0),
                     cnp.PyArray_EMPTY(1, &dims, f64, 0), cnp.PyArray_EMPTY(1, &dims, f64, 0),
                     cnp.PyArray_EMPTY(1, &dims, f64, 0), cnp.PyArray_EMPTY(1, &dims, f64, 0))
    cdef uint8_t* o_status = <uint8_t*>cnp.PyArray_DATA(out[0])
    cdef int32_t* o_in_flight = <int32_t*>cnp.PyArray_DATA(out[1])
    cdef int32_t* o_queue = <int32_t*>cnp.PyArray_DATA(out[2])
    cdef int32_t* o_kv = <int32_t*>cnp.PyArray_DATA(out[3])
    cdef double* o_prefill = <double*>cnp.PyArray_DATA(out[4])
    cdef double* o_tpot = <double*>cnp.PyArray_DATA(out[5])
    cdef double* o_batch = <double*>cnp.PyArray_DATA(out[6])
    cdef double* o_service = <double*>cnp.PyArray_DATA(out[7])
    cdef double* o_slot = <double*>cnp.PyArray_DATA(out[8])
    cdef double seen, v
    cdef bint ok = True
    with nogil:
        for r in range(n):
            seen = observed[r]
            # every value is checked, as the reference checks whole columns first
            if (not isnan(seen) and seen - seen != 0.0) or in_flight[r] < 0 or queue[r] < 0 or (kv != NULL and kv[r] < 0):
                ok = False
                break
            if ((prefill != NULL and not _override_ok(prefill[r], False)) or (tpot != NULL and not _override_ok(tpot[r], True))
                    or (service != NULL and not _override_ok(service[r], True))):
                ok = False
                break
            if isnan(seen):  # no signal, nothing known: as if the struct were absent
                o_status[r] = 4  # NO_SIGNAL
                o_in_flight[r] = 0
                o_queue[r] = 0
                if unmeasured:
                    continue
                o_kv[r] = kv_default[r]
                o_prefill[r] = prefill_default[r]
                o_tpot[r] = tpot_default[r]
                o_batch[r] = batch_default[r]
                o_service[r] = service_default[r]
            else:
                if healthy != NULL and not healthy[r]:
                    o_status[r] = 1  # UNHEALTHY
                elif draining != NULL and draining[r]:
                    o_status[r] = 2  # DRAINING
                elif now_ms - seen > max_age:
                    o_status[r] = 3  # STALE
                elif degraded != NULL and degraded[r]:
                    o_status[r] = 5  # DEGRADED
                else:
                    o_status[r] = 0  # OK
                o_in_flight[r] = in_flight[r]
                o_queue[r] = queue[r]
                if unmeasured:
                    continue
                o_kv[r] = kv[r] if kv != NULL else kv_default[r]
                v = prefill[r] if prefill != NULL else NAN
                o_prefill[r] = prefill_default[r] if isnan(v) else v
                v = tpot[r] if tpot != NULL else NAN
                if isnan(v):
                    o_tpot[r] = tpot_default[r]
                    o_batch[r] = batch_default[r]
                else:  # a measured step time replaces the profile's batch-size model
                    o_tpot[r] = v
                    o_batch[r] = 0.0
                v = service[r] if service != NULL else NAN
                if isnan(v):  # the profile's, scaled by the measured rates (snapshot.service_ms)
                    o_service[r] = service_default[r] * (
                        ((prefill_base[r] + o_prefill[r] * 1155) + 211 * (o_tpot[r] + o_batch[r] * service_batch[r]))
                        / service_basis[r])
                else:
                    o_service[r] = v
            o_slot[r] = o_service[r] / slots[r]
    return out if ok else None


# ------------------------------------------------------------- prefix index
cdef inline uint64_t _slot_key(uint64_t h) noexcept nogil:
    return h if h != 0 else 1


cdef inline int64_t _prefix_find(const StateC* st, uint64_t block_hash) noexcept nogil:
    cdef uint64_t key = _slot_key(block_hash)
    cdef uint64_t base = mix64(key) & st.mask
    cdef uint64_t slot, k
    cdef int p
    for p in range(PROBE):
        slot = (base + <uint64_t>p) & st.mask
        k = st.prefix[slot].key
        if k == key:
            return <int64_t>slot
        if k == 0:
            return -1
    return -1


cdef inline void _add_owner(PrefixEntry* e, int32_t replica, uint64_t stamp) noexcept nogil:
    cdef int free_way = -1
    cdef int oldest = 0
    cdef int w
    cdef int32_t o
    for w in range(WAYS):
        o = e.owner[w]
        if o == replica:
            e.stamp[w] = stamp
            return
        if o < 0:
            if free_way < 0:
                free_way = w
        elif e.stamp[w] < e.stamp[oldest]:
            oldest = w
    w = free_way if free_way >= 0 else oldest
    e.owner[w] = replica
    e.stamp[w] = stamp


cdef void _prefix_record(StateC* st, const uint64_t* prefix, Py_ssize_t n, int32_t replica) noexcept nogil:
    cdef uint64_t stamp, key, base, slot, k, newest, victim_stamp
    cdef int64_t victim
    cdef Py_ssize_t i
    cdef int p, w
    cdef bint placed
    cdef PrefixEntry* e
    st.clock[0] += 1
    stamp = st.clock[0]
    for i in range(n if n < 64 else 64):  # independent misses: ask for them all at once
        base = mix64(_slot_key(prefix[i])) & st.mask
        for p in range(PROBE):  # a block not in the index looks at every slot of its probe
            prefetch(&st.prefix[(base + <uint64_t>p) & st.mask])
    for i in range(n):
        key = _slot_key(prefix[i])
        base = mix64(key) & st.mask
        victim = -1
        victim_stamp = 0
        placed = False
        for p in range(PROBE):
            slot = (base + <uint64_t>p) & st.mask
            e = &st.prefix[slot]
            k = e.key
            if k == key or k == 0:
                e.key = key
                _add_owner(e, replica, stamp)
                placed = True
                break
            newest = e.stamp[0]
            for w in range(1, WAYS):
                if e.stamp[w] > newest:
                    newest = e.stamp[w]
            if victim < 0 or newest < victim_stamp:
                victim = <int64_t>slot
                victim_stamp = newest
        if not placed:
            e = &st.prefix[victim]
            e.key = key
            for w in range(WAYS):
                e.owner[w] = -1
                e.stamp[w] = 0
            _add_owner(e, replica, stamp)


cdef void _prefix_match(ModelC* m) noexcept nogil:
    # Leading blocks of the request's prefix each replica of [first, last) was sent.
    cdef const StateC* st = m.st
    cdef const ReqC* req = m.req
    cdef Py_ssize_t i
    cdef int64_t slot
    cdef int w, j
    cdef int32_t r
    cdef bint advanced
    cdef const PrefixEntry* e
    m.n_match = 0
    # The blocks' entries are independent cache misses in a table larger than the
    # caches: ask for all of them at once instead of one after another.
    for i in range(req.n_prefix if req.n_prefix < 64 else 64):
        prefetch(&st.prefix[mix64(_slot_key(req.prefix[i])) & st.mask])
    for i in range(req.n_prefix):
        slot = _prefix_find(st, req.prefix[i])
        if slot < 0:
            break
        e = &st.prefix[slot]
        advanced = False
        for w in range(WAYS):
            r = e.owner[w]
            if r < m.first or r >= m.last:
                continue
            if i == 0:  # an entry's owners are distinct: at most WAYS of them
                m.match_replica[m.n_match] = r
                m.match_blocks[m.n_match] = 1
                m.n_match += 1
                advanced = True
            else:
                for j in range(m.n_match):
                    if m.match_replica[j] == r and m.match_blocks[j] == i:
                        m.match_blocks[j] = <int32_t>(i + 1)
                        advanced = True
        if not advanced:
            break


cdef inline int64_t _matched(const ModelC* m, int r) noexcept nogil:
    cdef int j
    for j in range(m.n_match):
        if m.match_replica[j] == r:
            return m.match_blocks[j]
    return 0


# ------------------------------------------------------------ the decision
cdef inline int64_t _load(const ModelC* m, int r) noexcept nogil:
    return m.s.rows[r].in_flight + (m.st.pending[r] if m.live else 0)


cdef inline bint _candidate(const ModelC* m, int r) noexcept nogil:
    cdef Py_ssize_t i
    cdef const Row* row = &m.s.rows[r]
    if not row.usable or (m.healthy_only and row.degraded):
        return False
    if m.version >= 0 and row.version != m.version:
        return False
    for i in range(m.req.n_exclude):
        if m.req.exclude[i] == r:
            return False
    return True


cdef inline bint _admitted(const ModelC* m, int r) noexcept nogil:
    return <double>_load(m, r) < m.req.ceiling * <double>m.s.rows[r].decode_slots


cdef inline double _queue_ms(const ModelC* m, int r, const Row* row, int64_t extra) noexcept nogil:
    # the twin's predict(): waiting requests cost a departure each when the slots are
    # full, else a prefill each, plus this router's sends since the snapshot - or, if
    # longer, the rest of the prefills it sent (prefill_until_ms); then the departures
    cdef double ewma = m.st.prefill_ewma_ms[r]
    cdef double each = row.slot_ms if (row.in_flight >= row.decode_slots or isnan(ewma)) else ewma
    cdef double behind = <double>row.queue_depth * each + (m.st.pending_prefill_ms[r] if m.live else 0.0)
    cdef double own = m.st.prefill_until_ms[r] - m.s.now_ms
    return (behind if behind >= own else own) + <double>extra * row.slot_ms


cdef inline void _predict(const ModelC* m, int r, int64_t load, PickC* out) noexcept nogil:
    cdef const Row* row = &m.s.rows[r]
    cdef const ReqC* req = m.req
    cdef int64_t slots = row.decode_slots
    cdef int64_t extra = load + 1 - slots
    cdef int64_t batch = load + 1
    cdef int64_t cached
    if extra < 0:
        extra = 0
    if batch > slots:
        batch = slots
    out.network = m.f.rtt_ms[req.origin * m.f.n_locations + row.region]
    out.queue = _queue_ms(m, r, row, extra)
    cached = _matched(m, r) * req.block_tokens
    if cached > req.prompt_tokens:
        cached = req.prompt_tokens
    out.cached = cached
    out.prefill = row.prefill_base_ms + row.prefill_ms_per_token * <double>(req.prompt_tokens - cached)
    out.decode = row.tpot_base_ms + row.tpot_ms_per_batch * <double>batch
    out.ttft = out.network + out.queue + out.prefill + out.decode


cdef inline double _ttft(const ModelC* m, int r, int64_t load) noexcept nogil:
    # The same expression as _predict's ttft, without storing the split.
    cdef const Row* row = &m.s.rows[r]
    cdef const ReqC* req = m.req
    cdef int64_t slots = row.decode_slots
    cdef int64_t extra = load + 1 - slots
    cdef int64_t batch = load + 1
    cdef int64_t cached = _matched(m, r) * req.block_tokens
    if extra < 0:
        extra = 0
    if batch > slots:
        batch = slots
    if cached > req.prompt_tokens:
        cached = req.prompt_tokens
    return (m.f.rtt_ms[req.origin * m.f.n_locations + row.region]
            + _queue_ms(m, r, row, extra)
            + (row.prefill_base_ms + row.prefill_ms_per_token * <double>(req.prompt_tokens - cached))
            + (row.tpot_base_ms + row.tpot_ms_per_batch * <double>batch))


cdef int _ring_home(const ModelC* m, int region) noexcept nogil:
    cdef const FleetC* f = m.f
    cdef int g = m.model * f.n_regions + region
    cdef int start = f.ring_start[g]
    cdef int end = f.ring_start[g + 1]
    cdef int size = end - start
    cdef uint64_t pos
    cdef int lo, hi, mid, at, step, r
    if size == 0:
        return -1
    pos = mix64(m.req.ring_key)
    lo = start
    hi = end
    while lo < hi:
        mid = (lo + hi) // 2
        if f.ring_points[mid] < pos:
            lo = mid + 1
        else:
            hi = mid
    at = lo - start
    for step in range(size):
        r = f.ring_owner[start + (at + step) % size]
        if _candidate(m, r) and _admitted(m, r):
            return r
    return -1


cdef void _budgets(const ModelC* m, double* b_local, double* b_cross) noexcept nogil:
    cdef const FleetC* f = m.f
    cdef const ReqC* req = m.req
    cdef double share = f.inference_share_ms
    cdef double cold = f.model_prefill_base_ms[m.model] + f.model_prefill_ms_per_token[m.model] * <double>req.prompt_tokens
    cdef double local = req.local_budget
    cdef double cross = req.cross_budget
    cdef double stretched_local = cold + (local - share)
    cdef double stretched_cross = cold + (cross - share)
    b_local[0] = (local if local >= stretched_local else stretched_local) - req.waited_ms
    b_cross[0] = (cross if cross >= stretched_cross else stretched_cross) - req.waited_ms


cdef void _model_open(ModelC* m, const FleetC* f, const SnapC* s, const StateC* st, const ReqC* req,
                      int64_t state_epoch, int model, int version) noexcept nogil:
    m.f = f
    m.s = s
    m.st = st
    m.req = req
    m.model = model
    m.version = version
    m.first = f.model_start[model]
    m.last = f.model_start[model + 1]
    m.live = state_epoch == s.epoch
    m.healthy_only = False
    _prefix_match(m)


cdef inline void _no_target(PickC* pick) noexcept nogil:
    pick.replica = -1
    pick.network = 0.0
    pick.queue = 0.0
    pick.prefill = 0.0
    pick.decode = 0.0
    pick.ttft = 0.0
    pick.cached = 0
    pick.n_fallbacks = 0


cdef struct GroupC:
    # A scan of one (model, region) group (the twin's _Group).
    int region
    int first
    int last
    int64_t load_sum
    int64_t slot_sum
    int64_t n_ok
    int best
    double best_ttft


cdef struct RankC:
    # The best few (ttft, replica), best first: the retry list.
    int n
    int keep
    double ttft[MAX_RANKED]
    int replica[MAX_RANKED]


cdef inline void _group_open(const ModelC* m, int region, GroupC* group) noexcept nogil:
    cdef int g = m.model * m.f.n_regions + region
    group.region = region
    group.first = m.f.group_start[g]
    group.last = m.f.group_start[g + 1]
    group.load_sum = 0
    group.slot_sum = 0
    group.n_ok = 0
    group.best = -1
    group.best_ttft = INFINITY


cdef inline void _rank(RankC* ranked, double ttft, int r) noexcept nogil:
    cdef int at = ranked.n
    cdef int j
    while at > 0 and ranked.ttft[at - 1] > ttft:
        at -= 1
    if at < ranked.keep:
        j = ranked.n if ranked.n < ranked.keep else ranked.keep - 1
        while j > at:
            ranked.ttft[j] = ranked.ttft[j - 1]
            ranked.replica[j] = ranked.replica[j - 1]
            j -= 1
        ranked.ttft[at] = ttft
        ranked.replica[at] = r
        if ranked.n < ranked.keep:
            ranked.n += 1


cdef bint _has_candidate(const ModelC* m) noexcept nogil:
    cdef int r
    for r in range(m.first, m.last):
        if _candidate(m, r):
            return True
    return False


cdef inline bint _under_bound(const ModelC* m, int r, const GroupC* group) noexcept nogil:
    cdef double capacity = ceil(m.f.load_bound * <double>(group.load_sum + 1) / <double>group.n_ok)
    return <double>(_load(m, r) + 1) <= capacity


cdef int _affinity(const ModelC* m, const GroupC* group, double budget) noexcept nogil:
    cdef int r
    if not m.req.has_key:
        return -1
    r = _ring_home(m, group.region)
    if r >= 0 and _under_bound(m, r, group) and _ttft(m, r, _load(m, r)) <= budget:
        return r
    return -1


cdef void _scan_load(const ModelC* m, GroupC* group) noexcept nogil:
    cdef int r
    if not m.s.region_up[group.region]:
        return
    for r in range(group.first, group.last):
        if m.s.rows[r].usable:
            group.load_sum += _load(m, r)
            group.slot_sum += m.s.rows[r].decode_slots
            group.n_ok += 1


cdef void _scan_home(const ModelC* m, GroupC* group, double b_cross, PickC* pick, RankC* ranked) noexcept nogil:
    """The home group in one pass: its load sums, its best admitted replica, the
    retry list and the soonest admission wait (the twin's scan_load + scan_home)."""
    # Everything the loop reads is copied into locals: the loop stores through
    # pointers, so the compiler could not otherwise keep them in registers.
    cdef const Row* rows = m.s.rows
    cdef const int32_t* pending = m.st.pending
    cdef const int32_t* exclude = m.req.exclude
    cdef Py_ssize_t n_exclude = m.req.n_exclude
    cdef bint live = m.live
    cdef bint healthy_only = m.healthy_only
    cdef int version = m.version
    cdef int first = m.first
    cdef double ceiling = m.req.ceiling
    cdef int64_t prompt = m.req.prompt_tokens
    cdef int64_t block_tokens = m.req.block_tokens
    cdef double network = m.f.rtt_ms[m.req.origin * m.f.n_locations + group.region]
    cdef bint region_up = m.s.region_up[group.region] != 0
    cdef int64_t load_sum = 0, slot_sum = 0, n_ok = 0
    cdef int best = -1
    cdef double best_ttft = INFINITY
    cdef const Row* row
    cdef int r
    cdef Py_ssize_t i
    cdef int64_t load, slots, k, extra, batch, cached
    cdef double ttft, wait
    cdef bint excluded
    if not region_up:
        return
    for r in range(group.first, group.last):
        row = &rows[r]
        if not row.usable:
            continue
        load = row.in_flight + (pending[r] if live else 0)
        slots = row.decode_slots
        load_sum += load
        slot_sum += slots
        n_ok += 1
        if (version >= 0 and row.version != version) or (healthy_only and row.degraded):
            continue
        excluded = False
        for i in range(n_exclude):
            if exclude[i] == r:
                excluded = True
        if excluded:
            continue
        if not (<double>load < ceiling * <double>slots):
            # departures needed before this class is admitted here
            k = <int64_t>floor(<double>load - ceiling * <double>slots) + 1
            wait = <double>k * row.slot_ms
            if wait < pick.wait_ms:
                pick.wait_ms = wait
                pick.wait_replica = r
                pick.wait_load = load - k
            continue
        extra = load + 1 - slots
        if extra < 0:
            extra = 0
        batch = load + 1
        if batch > slots:
            batch = slots
        cached = _matched(m, r) * block_tokens
        if cached > prompt:
            cached = prompt
        # the same expression, in the same order, as _predict and the twin's predict
        ttft = (network + _queue_ms(m, r, row, extra)
                + (row.prefill_base_ms + row.prefill_ms_per_token * <double>(prompt - cached))
                + (row.tpot_base_ms + row.tpot_ms_per_batch * <double>batch))
        if ttft < best_ttft:
            best_ttft = ttft
            best = r
        if ttft <= b_cross:
            _rank(ranked, ttft, r)
    group.load_sum = load_sum
    group.slot_sum = slot_sum
    group.n_ok = n_ok
    group.best = best
    group.best_ttft = best_ttft


cdef void _scan_remote(const ModelC* m, GroupC* group, double b_cross, RankC* ranked) noexcept nogil:
    cdef int r
    cdef double ttft
    for r in range(group.first, group.last):
        if not (_candidate(m, r) and _admitted(m, r)):
            continue
        ttft = _ttft(m, r, _load(m, r))
        if ttft > b_cross:
            continue
        if ttft < group.best_ttft:
            group.best_ttft = ttft
            group.best = r
        if ranked != NULL:
            _rank(ranked, ttft, r)


cdef bint _accepts_spill(const ModelC* m, const GroupC* group) noexcept nogil:
    cdef int home = m.req.home
    cdef int n_regions = m.f.n_regions
    cdef double pair, total
    if group.slot_sum == 0 or not (<double>group.load_sum < m.f.spill_ceiling * <double>group.slot_sum):
        return False
    pair = m.s.spill_pair[home * n_regions + group.region]
    total = m.s.spill_total[group.region]
    if m.live:
        pair -= m.st.spill_pair[home * n_regions + group.region]
        total -= m.st.spill_total[group.region]
    # one token, above the class's reserve for the classes above it
    return pair >= m.req.spill_need and total >= m.req.spill_need


cdef void _choose(ModelC* m, double b_local, double b_cross, PickC* pick) noexcept nogil:
    # Envoy's degraded hosts: replicas in soft failure are candidates only when no
    # healthy one will do (a second pass over all of them; the twin's choose())
    m.healthy_only = m.s.any_degraded
    _choose_pass(m, b_local, b_cross, pick)
    if pick.replica < 0 and m.healthy_only:
        m.healthy_only = False
        _choose_pass(m, b_local, b_cross, pick)


cdef void _choose_pass(const ModelC* m, double b_local, double b_cross, PickC* pick) noexcept nogil:
    cdef const FleetC* f = m.f
    cdef const ReqC* req = m.req
    cdef GroupC home, group, target
    cdef RankC ranked
    cdef bint have_target = False
    cdef int g, j, chosen, action, reason
    cdef double budget

    pick.action = -1
    pick.reason = -1
    _no_target(pick)
    pick.budget = 0.0
    pick.wait_replica = -1
    pick.wait_ms = INFINITY
    pick.wait_load = 0
    ranked.n = 0
    ranked.keep = f.max_fallbacks + 1

    _group_open(m, req.home, &home)
    _scan_home(m, &home, b_cross, pick, &ranked)

    # Home region: the affinity home while under its bound, else the fastest.
    chosen = _affinity(m, &home, b_local)
    action = SERVE
    reason = R_AFFINITY
    budget = b_local
    if chosen < 0 and home.best >= 0 and home.best_ttft <= b_local:
        chosen = home.best
        reason = R_LEAST_TTFT
    # Overflow: the remote region with the lowest predicted TTFT within budget.
    if chosen < 0:
        for g in range(f.n_regions):
            if g == req.home:
                continue
            _group_open(m, g, &group)
            _scan_load(m, &group)
            if not _accepts_spill(m, &group):
                continue
            _scan_remote(m, &group, b_cross, NULL)
            if group.best < 0:
                continue
            if not have_target or group.best_ttft < target.best_ttft or (
                group.best_ttft == target.best_ttft
                and f.rtt_ms[req.origin * f.n_locations + g] < f.rtt_ms[req.origin * f.n_locations + target.region]
            ):
                target = group
                have_target = True
        if have_target:
            chosen = _affinity(m, &target, b_cross)
            action = OVERFLOW
            reason = R_SPILL_AFFINITY
            budget = b_cross
            if chosen < 0:
                chosen = target.best
                reason = R_SPILL_LEAST_TTFT
            ranked.n = 0
            _group_open(m, target.region, &group)
            _scan_remote(m, &group, b_cross, &ranked)
    # Within the user-facing SLA at home, outside the routing target.
    if chosen < 0 and home.best >= 0 and home.best_ttft <= b_cross:
        chosen = home.best
        action = SERVE
        reason = R_LOCAL_DEGRADED
        budget = b_cross

    if chosen >= 0:
        _predict(m, chosen, _load(m, chosen), pick)
        pick.action = action
        pick.reason = reason
        pick.replica = chosen
        pick.budget = budget
        for j in range(ranked.n):
            if ranked.replica[j] != chosen and pick.n_fallbacks < f.max_fallbacks:
                pick.fallbacks[pick.n_fallbacks] = ranked.replica[j]
                pick.n_fallbacks += 1


cdef inline int64_t _retry(const FleetC* f, double wait_ms) noexcept nogil:
    cdef int64_t ms = <int64_t>ceil(wait_ms)
    return ms if ms > f.min_retry_after_ms else f.min_retry_after_ms


cdef void _decide(const FleetC* f, const SnapC* s, const StateC* st, int64_t state_epoch, const ReqC* req,
                  int model, int version, PickC* out, int* out_model, int64_t* retry) noexcept nogil:
    """Fill ``out`` (the twin's decide). Allocates nothing."""
    cdef ModelC main
    cdef ModelC small
    cdef PickC alt
    cdef double b_local, b_cross, fb_local, fb_cross, wait
    cdef bint queue_full = False
    cdef bint small_open = False
    cdef int r, fallback
    out_model[0] = model
    retry[0] = -1
    _model_open(&main, f, s, st, req, state_epoch, model, version)
    _budgets(&main, &b_local, &b_cross)
    _choose(&main, b_local, b_cross, out)
    if out.replica >= 0:
        return

    # Queue: a home replica will admit this class soon enough for the budget.
    r = out.wait_replica
    if r >= 0:
        _predict(&main, r, out.wait_load, &alt)
        alt.queue = out.wait_ms + alt.queue
        alt.ttft = alt.network + alt.queue + alt.prefill + alt.decode
        if alt.ttft <= b_cross:
            if st.queued[req.home] < f.region_slots[req.home]:
                out.action = QUEUE
                out.reason = R_WAIT_FOR_SLOT
                out.replica = r
                out.network = alt.network
                out.queue = alt.queue
                out.prefill = alt.prefill
                out.decode = alt.decode
                out.ttft = alt.ttft
                out.cached = alt.cached
                out.budget = b_cross
                out.n_fallbacks = 0
                retry[0] = _retry(f, out.wait_ms)
                return
            queue_full = True

    # Degrade: the fallback model, any version, when it can serve now.
    fallback = f.fallback_model[model]
    if fallback >= 0:
        _model_open(&small, f, s, st, req, state_epoch, fallback, -1)
        small_open = True
        _budgets(&small, &fb_local, &fb_cross)
        _choose(&small, fb_local, fb_cross, &alt)
        if alt.replica >= 0:
            out[0] = alt
            out.action = DEGRADE
            out.reason = R_FALLBACK_MODEL
            out_model[0] = fallback
            return

    wait = out.wait_ms if out.wait_replica >= 0 else <double>f.default_retry_after_ms
    out.action = SHED
    if not (_has_candidate(&main) or (small_open and _has_candidate(&small))):
        out.reason = R_NO_REPLICA
    elif queue_full:
        out.reason = R_QUEUE_FULL
    else:
        out.reason = R_OVER_BUDGET
    _no_target(out)
    out.budget = b_cross
    retry[0] = _retry(f, wait)


cdef inline void _class_of(const FleetC* f, ReqC* req) noexcept:
    # The request's home region and its class's budgets, ceiling and spill need.
    req.home = f.home[req.origin]
    req.local_budget = f.class_local_budget_ms[req.priority]
    req.cross_budget = f.class_cross_budget_ms[req.priority]
    req.ceiling = f.class_slot_ceiling[req.priority]
    req.spill_need = 1.0 + f.class_spill_reserve[req.priority]
    req.max_tokens_cap = f.class_degrade_max_tokens[req.priority]


# ------------------------------------------------------------ Python face
def decide(snapshot, state, int model, int version, int origin, int priority, int64_t prompt_tokens,
           uint64_t ring_key, bint has_key, cnp.ndarray prefix, int64_t block_tokens,
           cnp.ndarray exclude, double waited_ms):
    """The decision as a tuple (see geoserve._compat); the scan runs without the GIL."""
    cdef SnapshotView sv = _snapshot_view(snapshot)
    cdef StateView tv = _state_view(state)
    cdef ReqC req
    cdef PickC out
    cdef int out_model
    cdef int64_t retry
    cdef int64_t state_epoch = state.epoch
    if cnp.PyArray_TYPE(prefix) != cnp.NPY_UINT64 or not cnp.PyArray_IS_C_CONTIGUOUS(prefix) or cnp.PyArray_NDIM(prefix) != 1:
        raise TypeError("prefix must be a 1-D C-contiguous uint64 array")
    if cnp.PyArray_TYPE(exclude) != cnp.NPY_INT32 or not cnp.PyArray_IS_C_CONTIGUOUS(exclude) or cnp.PyArray_NDIM(exclude) != 1:
        raise TypeError("exclude must be a 1-D C-contiguous int32 array")
    if not (0 <= origin < sv.f.n_locations) or not (0 <= model < len(snapshot.fleet.models)):
        raise IndexError("origin or model out of range")
    if not (0 <= priority < len(snapshot.fleet.priorities)):
        raise IndexError("priority out of range")
    req.origin = origin
    req.priority = priority
    req.prompt_tokens = prompt_tokens
    req.ring_key = ring_key
    req.has_key = has_key
    req.prefix = <const uint64_t*>cnp.PyArray_DATA(prefix)
    req.n_prefix = cnp.PyArray_DIM(prefix, 0)
    req.block_tokens = block_tokens
    req.exclude = <const int32_t*>cnp.PyArray_DATA(exclude)
    req.n_exclude = cnp.PyArray_DIM(exclude, 0)
    req.waited_ms = waited_ms
    _class_of(&sv.f, &req)
    with nogil:
        _decide(&sv.f, &sv.s, &tv.st, state_epoch, &req, model, version, &out, &out_model, &retry)
    fallbacks = tuple([out.fallbacks[i] for i in range(out.n_fallbacks)])
    return (out.action, out.reason, out_model, out.replica, fallbacks, out.network, out.queue,
            out.prefill, out.decode, out.ttft, out.budget, out.cached, retry)


def prefix_record(state, cnp.ndarray prefix, int replica):
    """Remember that ``replica`` was sent every block of ``prefix`` (one clock tick)."""
    cdef StateView tv = _state_view(state)
    if cnp.PyArray_TYPE(prefix) != cnp.NPY_UINT64 or not cnp.PyArray_IS_C_CONTIGUOUS(prefix) or cnp.PyArray_NDIM(prefix) != 1:
        raise TypeError("prefix must be a 1-D C-contiguous uint64 array")
    if not (0 <= replica < state.n_replicas):
        raise IndexError("replica out of range")
    cdef const uint64_t* data = <const uint64_t*>cnp.PyArray_DATA(prefix)
    cdef Py_ssize_t n = cnp.PyArray_DIM(prefix, 0)
    with nogil:
        _prefix_record(&tv.st, data, n, replica)


# ------------------------------------------------------------ route / complete
cdef void _record(const FleetC* f, const SnapC* s, StateC* st, int64_t state_epoch, int action, int replica,
                  int origin, const uint64_t* prefix, Py_ssize_t n_prefix, double prefill_ms) noexcept nogil:
    cdef int home = f.home[origin]
    cdef int region
    cdef double ewma, until
    if action == SERVE or action == OVERFLOW or action == DEGRADE:
        _prefix_record(st, prefix, n_prefix, replica)
        ewma = st.prefill_ewma_ms[replica]
        st.prefill_ewma_ms[replica] = prefill_ms if isnan(ewma) else ewma + (prefill_ms - ewma) * (1.0 / 16.0)
        until = st.prefill_until_ms[replica]
        st.prefill_until_ms[replica] = (until if until > s.now_ms else s.now_ms) + prefill_ms
        if s.epoch == state_epoch:  # a late caller's stale snapshot counts nothing
            st.pending[replica] += 1
            st.pending_prefill_ms[replica] += prefill_ms
            region = f.replica_region[replica]
            if region != home:
                st.spill_pair[home * f.n_regions + region] += 1
                st.spill_total[region] += 1
    elif action == QUEUE:
        st.queued[home] += 1


cdef void _release(StateC* st, int64_t state_epoch, int action, int replica, int64_t epoch, int home,
                   double prefill_ms) noexcept nogil:
    cdef double left
    if action == SERVE or action == OVERFLOW or action == DEGRADE:
        if replica >= 0:  # done: its prefill is no longer ahead of anything (whatever the epoch)
            st.prefill_until_ms[replica] = st.prefill_until_ms[replica] - prefill_ms
        if replica >= 0 and epoch == state_epoch and st.pending[replica] > 0:
            st.pending[replica] -= 1
            left = st.pending_prefill_ms[replica] - prefill_ms
            st.pending_prefill_ms[replica] = left if left > 0.0 else 0.0
    elif action == QUEUE:
        if home >= 0 and st.queued[home] > 0:
            st.queued[home] -= 1


def record(snapshot, state, int action, int replica, int origin, cnp.ndarray prefix, double prefill_ms):
    """What route() remembers of a decision made against ``snapshot``."""
    cdef SnapshotView sv = _snapshot_view(snapshot)
    cdef StateView tv = _state_view(state)
    if cnp.PyArray_TYPE(prefix) != cnp.NPY_UINT64 or not cnp.PyArray_IS_C_CONTIGUOUS(prefix) or cnp.PyArray_NDIM(prefix) != 1:
        raise TypeError("prefix must be a 1-D C-contiguous uint64 array")
    if not (0 <= origin < sv.f.n_locations) or (action != QUEUE and action != SHED and not (0 <= replica < state.n_replicas)):
        raise IndexError("origin or replica out of range")
    _record(&sv.f, &sv.s, &tv.st, state.epoch, action, replica, origin,
            <const uint64_t*>cnp.PyArray_DATA(prefix), cnp.PyArray_DIM(prefix, 0), prefill_ms)


def release(state, int action, int replica, int64_t epoch, int home, double prefill_ms):
    """What complete() gives back: its prefill from prefill_until_ms, the in-flight
    count (same epoch only) or the queue slot."""
    cdef StateView tv = _state_view(state)
    if replica >= state.n_replicas or home >= state.n_regions:
        raise IndexError("replica or region out of range")
    _release(&tv.st, state.epoch, action, replica, epoch, home, prefill_ms)


# ------------------------------------------------------------ the boundary, compiled
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.ref cimport Py_INCREF
from libc.math cimport isfinite


cdef int64_t MAX_COUNT = 2147483648  # counts above 2**31 are no request's: the Python boundary refuses them


cdef inline bint _plain_count(object value, int64_t* out) noexcept:
    # An exact int in [0, 2**31]; anything else takes the Python boundary (which names the field).
    cdef int64_t v
    if type(value) is not int:
        return False
    try:
        v = value
    except OverflowError:
        return False
    if v < 0 or v > MAX_COUNT:
        return False
    out[0] = v
    return True


cdef class Boundary:
    """router.py's request-to-decision path for the common case, compiled.

    ``decide`` / ``route`` return a :class:`Decision`, or ``None`` when the request
    needs the Python boundary (any error, a tuple prefix, unusual types): that path
    stays the one place where validation and error messages are written, and the
    differential tests hold this one to it.
    """
    def __cinit__(self, router, decision_cls, action_names, reason_names):
        fleet = router.fleet
        self.router = router
        self.fleet = fleet
        self.decision_cls = decision_cls
        self.action_names = tuple(action_names)
        self.reason_names = tuple(reason_names)
        self.action_codes = {name: code for code, name in enumerate(self.action_names)}
        self.region_index = dict(fleet.region_index)
        refs = {}
        for m, name in enumerate(fleet.models):
            refs[name] = (m, -1)
            for v in sorted(fleet.model_versions[m]):
                refs[f"{name}@{fleet.versions[v]}"] = (m, v)
        refs.update(fleet.aliases)
        self.model_refs = refs
        self.versions_by_model = [{fleet.versions[v]: v for v in fleet.model_versions[m]} for m in range(len(fleet.models))]
        self.locations = dict(fleet.location_index)
        self.priorities = dict(fleet.priority_index)
        self.replica_index = dict(fleet.replica_index)
        self.replica_ids = list(fleet.replica_ids)
        self.endpoints = list(fleet.endpoints)
        regions = fleet.topology.regions
        self.replica_region_names = [regions[g] for g in fleet.replica_region]
        self.replica_version_names = [fleet.versions[v] for v in fleet.replica_version]
        self.model_names = list(fleet.models)
        self.home_region_names = [regions[g] for g in fleet.home]
        self.ring_key_tokens = fleet.policy.ring_key_tokens
        self.n_replicas = fleet.n_replicas
        self.n_regions = fleet.n_regions
        self.state = router.state
        self.acquire = router.state.lock.acquire
        self.release_lock = router.state.lock.release

    cdef int _state(self, state) except -1:
        # The router's state, or one of this fleet's shape passed to decide().
        if state is self.state:
            return 1
        return state.n_replicas == self.n_replicas and state.n_regions == self.n_regions

    cdef int resolve_names(self, model, origin, priority, int* ids) except -1:
        cdef object ref = self.model_refs.get(model)
        if ref is None:
            return 0
        ids[0] = (<tuple>ref)[0]
        ids[1] = (<tuple>ref)[1]
        origin = self.locations.get(origin)
        priority = self.priorities.get(priority)
        if origin is None or priority is None:
            return 0
        ids[2] = origin
        ids[3] = priority
        return 1

    cdef int ring_key(self, session, ReqC* req) except -1:
        cdef int64_t k
        cdef Py_ssize_t size
        cdef const char* utf8
        if session is None:
            if req.n_prefix > 0:
                k = (self.ring_key_tokens + req.block_tokens - 1) // req.block_tokens
                if k < 1:
                    k = 1
                if k > req.n_prefix:
                    k = req.n_prefix
                req.ring_key = req.prefix[k - 1]
                req.has_key = True
            else:
                req.ring_key = 0
                req.has_key = False
            return 1
        if type(session) is not str:
            return 0
        try:
            utf8 = PyUnicode_AsUTF8AndSize(session, &size)
        except UnicodeEncodeError:
            return 0
        req.ring_key = XXH3_64bits(utf8, size)
        req.has_key = True
        return 1

    cdef int _resolve(self, request, snapshot, ReqC* req, int* model, int* version, int32_t* exclude) except -1:
        """Fill ``req``; 0 when the Python boundary must take over."""
        cdef object v, value, prefix, excl
        cdef int64_t count, n
        cdef double waited
        cdef Py_ssize_t i
        cdef cnp.ndarray arr
        cdef int ids[4]
        if snapshot.fleet is not self.fleet:
            return 0
        if not self.resolve_names(request.model, request.origin, request.priority, ids):
            return 0
        model[0] = ids[0]
        version[0] = ids[1]
        v = request.version
        if v is not None:
            v = (<dict>self.versions_by_model[model[0]]).get(v)
            if v is None:
                return 0
            version[0] = v
        req.origin = ids[2]
        req.priority = ids[3]
        if not _plain_count(request.prompt_tokens, &req.prompt_tokens):
            return 0
        if not _plain_count(request.max_tokens, &req.max_tokens):
            return 0
        if not _plain_count(request.block_tokens, &req.block_tokens) or req.block_tokens < 1:
            return 0
        value = request.waited_ms
        if type(value) is float:
            waited = value
        elif type(value) is int and _plain_count(value, &count):
            waited = <double>count
        else:
            return 0
        if not (isfinite(waited) and waited >= 0.0):
            return 0
        req.waited_ms = waited

        prefix = request.prefix
        if type(prefix) is tuple and len(<tuple>prefix) == 0:
            req.prefix = NULL
            req.n_prefix = 0
        elif type(prefix) is cnp.ndarray:
            arr = <cnp.ndarray>prefix
            if cnp.PyArray_TYPE(arr) != cnp.NPY_UINT64 or cnp.PyArray_NDIM(arr) != 1 or not cnp.PyArray_IS_C_CONTIGUOUS(arr):
                return 0
            req.n_prefix = cnp.PyArray_DIM(arr, 0)
            if req.n_prefix > MAX_PREFIX_BLOCKS:
                return 0
            req.prefix = <const uint64_t*>cnp.PyArray_DATA(arr)
        else:
            return 0

        if not self.ring_key(request.session, req):
            return 0

        excl = request.exclude
        if type(excl) is not tuple:
            return 0
        n = len(<tuple>excl)
        if n > MAX_EXCLUDE:
            return 0
        req.n_exclude = 0
        for i in range(n):
            value = (<tuple>excl)[i]
            if type(value) is not str:
                return 0
            value = self.replica_index.get(value)  # ids unknown to this fleet exclude nothing
            if value is not None:
                exclude[req.n_exclude] = value
                req.n_exclude += 1
        req.exclude = exclude
        return 1

    cdef object _decision(self, request, const PickC* out, int out_model, int64_t retry, int64_t epoch,
                          const ReqC* req):
        cdef int origin = req.origin
        cdef int r = out.replica
        cdef int action = out.action
        cdef int i, n = out.n_fallbacks
        cdef tuple ids = PyTuple_New(n)
        cdef tuple eps = PyTuple_New(n)
        cdef object item
        cdef object region, replica, endpoint, version
        for i in range(n):
            item = self.replica_ids[out.fallbacks[i]]
            Py_INCREF(item)
            PyTuple_SET_ITEM(ids, i, item)
            item = self.endpoints[out.fallbacks[i]]
            Py_INCREF(item)
            PyTuple_SET_ITEM(eps, i, item)
        if r >= 0 and action != QUEUE:
            region = self.replica_region_names[r]
            replica = self.replica_ids[r]
            endpoint = self.endpoints[r]
            version = self.replica_version_names[r]
        else:
            region = self.home_region_names[origin]
            replica = endpoint = version = None
            r = -1
        return self.decision_cls(
            self.action_names[action], self.reason_names[out.reason], request, self.model_names[out_model],
            version, region, replica, endpoint, ids, eps,
            out.network, out.queue, out.prefill, out.decode, out.ttft, out.budget, out.cached,
            None if retry < 0 else retry, epoch, r,
            shortened(action, req) or None,
        )

    cpdef object fast_decide(self, request, snapshot, state):
        """The decision, or None to take the Python boundary."""
        cdef ReqC req
        cdef PickC out
        cdef int model, version, out_model
        cdef int64_t retry
        cdef int32_t exclude[MAX_EXCLUDE]
        if not self._state(state) or not self._resolve(request, snapshot, &req, &model, &version, exclude):
            return None
        cdef SnapshotView sv = _snapshot_view(snapshot)
        cdef StateView tv = _state_view(state)
        cdef int64_t state_epoch = state.epoch
        _class_of(&sv.f, &req)
        with nogil:
            _decide(&sv.f, &sv.s, &tv.st, state_epoch, &req, model, version, &out, &out_model, &retry)
        return self._decision(request, &out, out_model, retry, sv.s.epoch, &req)

    cpdef object fast_route(self, request, snapshot):
        """Decide and record under the state's lock, or None to take the Python boundary."""
        cdef ReqC req
        cdef PickC out
        cdef int model, version, out_model
        cdef int64_t retry, epoch
        cdef int32_t exclude[MAX_EXCLUDE]
        if not self._resolve(request, snapshot, &req, &model, &version, exclude):
            return None
        self.route_c(snapshot, &req, model, version, &out, &out_model, &retry, &epoch)
        return self._decision(request, &out, out_model, retry, epoch, &req)

    cdef int route_c(self, snapshot, ReqC* req, int model, int version, PickC* out, int* out_model, int64_t* retry,
                     int64_t* epoch) except -1:
        self._route_c(snapshot, req, model, version, out, out_model, retry, epoch, False)
        return 0

    cdef int route_plain_c(self, snapshot, ReqC* req, int model, int version, PickC* out, int* out_model,
                           int64_t* retry, int64_t* epoch) except -1:
        # route_c for a caller with a fast path for the plain route only: the
        # decision is recorded only when it sends the request to the model it asked
        # for (serve, overflow, or a degrade that neither changes the model nor
        # shortens the answer); 1 then, else 0 and nothing is recorded (the caller
        # asks again through Router.route, as if a moment later).
        return self._route_c(snapshot, req, model, version, out, out_model, retry, epoch, True)

    cdef int _route_c(self, snapshot, ReqC* req, int model, int version, PickC* out, int* out_model, int64_t* retry,
                      int64_t* epoch, bint plain_only) except -1:
        # decide and record under the state's lock (only a plain route when plain_only); whether it recorded
        cdef int64_t state_epoch
        cdef object state = self.state
        cdef SnapshotView sv = _snapshot_view(snapshot)
        cdef StateView tv = _state_view(state)
        cdef bint record
        _class_of(&sv.f, req)
        self.acquire()
        try:
            if sv.s.epoch > state.epoch:
                state.roll(sv.s.epoch)
            state_epoch = state.epoch
            with nogil:
                _decide(&sv.f, &sv.s, &tv.st, state_epoch, req, model, version, out, out_model, retry)
                record = not plain_only or (
                    (out.action == SERVE or out.action == OVERFLOW or out.action == DEGRADE)
                    and out_model[0] == model and shortened(out.action, req) == 0)
                if record:
                    _record(&sv.f, &sv.s, &tv.st, state_epoch, out.action, out.replica, req.origin, req.prefix,
                            req.n_prefix, out.prefill)
        finally:
            self.release_lock()
        epoch[0] = sv.s.epoch
        return record

    cpdef object fast_complete(self, decision, replica, ok):
        """Release what route() recorded; False to take the Python boundary (a
        different serving replica, whose prefix must be recorded, or an odd decision)."""
        cdef object code, region
        cdef int action, home = -1
        cdef int r
        if replica is not None and replica != decision.replica and ok:
            return False
        code = self.action_codes.get(decision.action)
        if code is None:
            return False
        action = code
        if action == QUEUE:
            region = self.region_index.get(decision.region)
            if region is None:
                return False
            home = region
        r = decision.replica_index
        if r >= self.n_replicas:
            return False
        if r >= 0 and self.replica_ids[r] != decision.replica:
            r = -1  # decided on another fleet (a membership change since): nothing of it is here
        self.release_c(action, r, decision.epoch, home, decision.prefill_ms)
        return True

    cdef int release_c(self, int action, int replica, int64_t epoch, int home, double prefill_ms) except -1:
        cdef object state = self.state
        cdef StateView tv = _state_view(state)
        self.acquire()
        try:
            _release(&tv.st, state.epoch, action, replica, epoch, home, prefill_ms)
        finally:
            self.release_lock()
        return 0

    # The router's public methods, bound onto it (Router._set_fleet): the compiled
    # path first, the Python boundary when it declines.
    def decide(self, request, snapshot, state=None):
        if state is None:
            state = self.router.state
        decision = self.fast_decide(request, snapshot, state)
        return decision if decision is not None else self.router._decide_python(request, snapshot, state)

    def route(self, request, snapshot):
        decision = self.fast_route(request, snapshot)
        return decision if decision is not None else self.router._route_python(request, snapshot)

    def complete(self, decision, replica=None, ok=True):
        if not self.fast_complete(decision, replica, ok):
            self.router._complete_python(decision, replica, ok)
