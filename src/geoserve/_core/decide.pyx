# cython: language_level=3
"""The routing decision, compiled: the twin of ``geoserve/_twin/decide.py``.

Same algorithm, same order of float operations (built with -ffp-contract=off), so
both give identical decisions; the differential tests hold them to it. The scan
runs in ``noexcept nogil`` functions over raw pointers that two view classes take
once - ``SnapshotView`` per snapshot, ``StateView`` per router state - because
acquiring a dozen memoryviews per call would cost more than the scan.
"""

cimport numpy as cnp
from libc.math cimport ceil, floor, INFINITY
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.stdlib cimport calloc, free

cnp.import_array()

cdef enum:
    SERVE = 0
    OVERFLOW = 1
    QUEUE = 2
    DEGRADE = 3
    SHED = 4

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
    PROBE = 8
    WAYS = 4
    MAX_REGIONS = 64
    MAX_RANKED = 17  # Policy.max_fallbacks <= 16, plus the primary

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
    const int32_t* fallback_model
    const int32_t* region_slots
    const uint64_t* ring_points
    const int32_t* ring_owner
    const int32_t* ring_start
    const double* class_local_budget_ms
    const double* class_cross_budget_ms
    const double* class_slot_ceiling
    double load_bound
    double spill_ceiling
    double inference_share_ms
    int max_fallbacks
    int64_t min_retry_after_ms
    int64_t default_retry_after_ms


cdef struct SnapC:
    int64_t epoch
    const uint8_t* status
    const uint8_t* region_up
    const int32_t* in_flight
    const int32_t* queue_depth
    const double* prefill_ms_per_token
    const double* tpot_base_ms
    const double* tpot_ms_per_batch
    const double* service_ms
    const double* spill_pair
    const double* spill_total


cdef struct StateC:
    int32_t* pending
    int32_t* spill_pair
    int32_t* spill_total
    int32_t* queued
    uint64_t* prefix_keys
    int32_t* prefix_owner
    uint64_t* prefix_stamp
    uint64_t* clock
    uint64_t mask


cdef struct ReqC:
    int origin
    int home
    int priority
    int64_t prompt_tokens
    uint64_t ring_key
    bint has_key
    const uint64_t* prefix
    Py_ssize_t n_prefix
    int64_t block_tokens
    const int32_t* exclude
    Py_ssize_t n_exclude
    double waited_ms
    double local_budget
    double cross_budget
    double ceiling


cdef struct PickC:
    int action
    int reason
    int replica
    double network
    double queue
    double prefill
    double decode
    double ttft
    double budget
    int64_t cached
    int n_fallbacks
    int fallbacks[MAX_RANKED]
    bint any_candidate
    int wait_replica
    double wait_ms
    int64_t wait_load


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
    int32_t* matched


cdef uint64_t _EMPTY = 0


cdef void* _ptr(object arr, object dtype, str name) except NULL:
    if not isinstance(arr, cnp.ndarray) or arr.dtype != dtype or not arr.flags.c_contiguous:
        raise TypeError(f"{name} must be a C-contiguous {dtype} array")
    if arr.size == 0:
        # A valid, never-dereferenced address for empty tables.
        return <void*>&_EMPTY
    return cnp.PyArray_DATA(<cnp.ndarray>arr)




cdef class SnapshotView:
    """Raw pointers into a Snapshot and its Fleet; keeps both alive."""
    cdef FleetC f
    cdef SnapC s
    cdef object snapshot

    def __cinit__(self, snapshot):
        import numpy as np
        fleet = snapshot.fleet
        if fleet.n_regions > MAX_REGIONS:
            raise ValueError(f"the compiled kernel handles at most {MAX_REGIONS} regions")
        self.snapshot = snapshot
        f64, i32, u8, u64 = np.float64, np.int32, np.uint8, np.uint64
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
        self.f.fallback_model = <int32_t*>_ptr(fleet.fallback_model, i32, "fallback_model")
        self.f.region_slots = <int32_t*>_ptr(fleet.region_slots, i32, "region_slots")
        self.f.ring_points = <uint64_t*>_ptr(fleet.ring_points, u64, "ring_points")
        self.f.ring_owner = <int32_t*>_ptr(fleet.ring_owner, i32, "ring_owner")
        self.f.ring_start = <int32_t*>_ptr(fleet.ring_start, i32, "ring_start")
        self.f.class_local_budget_ms = <double*>_ptr(fleet.class_local_budget_ms, f64, "class_local_budget_ms")
        self.f.class_cross_budget_ms = <double*>_ptr(fleet.class_cross_budget_ms, f64, "class_cross_budget_ms")
        self.f.class_slot_ceiling = <double*>_ptr(fleet.class_slot_ceiling, f64, "class_slot_ceiling")
        p = fleet.policy
        self.f.load_bound = p.load_bound
        self.f.spill_ceiling = p.spill_ceiling
        self.f.inference_share_ms = p.inference_share_ms
        self.f.max_fallbacks = p.max_fallbacks
        self.f.min_retry_after_ms = p.min_retry_after_ms
        self.f.default_retry_after_ms = p.default_retry_after_ms
        self.s.epoch = snapshot.epoch
        self.s.status = <uint8_t*>_ptr(snapshot.status, u8, "status")
        self.s.region_up = <uint8_t*>_ptr(snapshot.region_up, u8, "region_up")
        self.s.in_flight = <int32_t*>_ptr(snapshot.in_flight, i32, "in_flight")
        self.s.queue_depth = <int32_t*>_ptr(snapshot.queue_depth, i32, "queue_depth")
        self.s.prefill_ms_per_token = <double*>_ptr(snapshot.prefill_ms_per_token, f64, "prefill_ms_per_token")
        self.s.tpot_base_ms = <double*>_ptr(snapshot.tpot_base_ms, f64, "tpot_base_ms")
        self.s.tpot_ms_per_batch = <double*>_ptr(snapshot.tpot_ms_per_batch, f64, "tpot_ms_per_batch")
        self.s.service_ms = <double*>_ptr(snapshot.service_ms, f64, "service_ms")
        self.s.spill_pair = <double*>_ptr(snapshot.spill_pair, f64, "spill_pair")
        self.s.spill_total = <double*>_ptr(snapshot.spill_total, f64, "spill_total")


cdef class StateView:
    """Raw pointers into a RouterState's arrays; keeps the state alive."""
    cdef StateC st
    cdef object state

    def __cinit__(self, state):
        import numpy as np
        self.state = state
        i32, u64 = np.int32, np.uint64
        self.st.pending = <int32_t*>_ptr(state.pending, i32, "pending")
        self.st.spill_pair = <int32_t*>_ptr(state.spill_pair, i32, "spill_pair")
        self.st.spill_total = <int32_t*>_ptr(state.spill_total, i32, "spill_total")
        self.st.queued = <int32_t*>_ptr(state.queued, i32, "queued")
        self.st.prefix_keys = <uint64_t*>_ptr(state.prefix_keys, u64, "prefix_keys")
        self.st.prefix_owner = <int32_t*>_ptr(state.prefix_owner, i32, "prefix_owner")
        self.st.prefix_stamp = <uint64_t*>_ptr(state.prefix_stamp, u64, "prefix_stamp")
        self.st.clock = <uint64_t*>_ptr(state.clock, u64, "clock")
        self.st.mask = <uint64_t>(len(state.prefix_keys) - 1)


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


# ------------------------------------------------------------------ hashing
cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    cdef uint64_t z = x + <uint64_t>0x9E3779B97F4A7C15ULL
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EBULL
    return z ^ (z >> 31)


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
        k = st.prefix_keys[slot]
        if k == key:
            return <int64_t>slot
        if k == 0:
            return -1
    return -1


cdef inline void _add_owner(StateC* st, uint64_t slot, int32_t replica, uint64_t stamp) noexcept nogil:
    cdef uint64_t first = slot * WAYS
    cdef int64_t free_way = -1
    cdef uint64_t oldest = first
    cdef uint64_t w
    cdef int32_t o
    for w in range(first, first + WAYS):
        o = st.prefix_owner[w]
        if o == replica:
            st.prefix_stamp[w] = stamp
            return
        if o < 0:
            if free_way < 0:
                free_way = <int64_t>w
        elif st.prefix_stamp[w] < st.prefix_stamp[oldest]:
            oldest = w
    w = <uint64_t>free_way if free_way >= 0 else oldest
    st.prefix_owner[w] = replica
    st.prefix_stamp[w] = stamp


cdef void _prefix_record(StateC* st, const uint64_t* prefix, Py_ssize_t n, int32_t replica) noexcept nogil:
    cdef uint64_t stamp, key, base, slot, k, newest, victim_stamp
    cdef int64_t victim
    cdef Py_ssize_t i
    cdef int p, w
    cdef bint placed
    st.clock[0] += 1
    stamp = st.clock[0]
    for i in range(n):
        key = _slot_key(prefix[i])
        base = mix64(key) & st.mask
        victim = -1
        victim_stamp = 0
        placed = False
        for p in range(PROBE):
            slot = (base + <uint64_t>p) & st.mask
            k = st.prefix_keys[slot]
            if k == key or k == 0:
                st.prefix_keys[slot] = key
                _add_owner(st, slot, replica, stamp)
                placed = True
                break
            newest = st.prefix_stamp[slot * WAYS]
            for w in range(1, WAYS):
                if st.prefix_stamp[slot * WAYS + w] > newest:
                    newest = st.prefix_stamp[slot * WAYS + w]
            if victim < 0 or newest < victim_stamp:
                victim = <int64_t>slot
                victim_stamp = newest
        if not placed:
            st.prefix_keys[victim] = key
            for w in range(WAYS):
                st.prefix_owner[victim * WAYS + w] = -1
                st.prefix_stamp[victim * WAYS + w] = 0
            _add_owner(st, <uint64_t>victim, replica, stamp)


cdef void _prefix_match(const StateC* st, const ReqC* req, int first, int last, int32_t* matched) noexcept nogil:
    cdef Py_ssize_t i
    cdef int64_t slot
    cdef uint64_t w
    cdef int32_t r
    cdef bint advanced
    for i in range(req.n_prefix):
        slot = _prefix_find(st, req.prefix[i])
        if slot < 0:
            break
        advanced = False
        for w in range(<uint64_t>slot * WAYS, <uint64_t>slot * WAYS + WAYS):
            r = st.prefix_owner[w]
            if r >= first and r < last and matched[r - first] == i:
                matched[r - first] = <int32_t>(i + 1)
                advanced = True
        if not advanced:
            break


# ------------------------------------------------------------ the decision
cdef inline int64_t _load(const ModelC* m, int r) noexcept nogil:
    return m.s.in_flight[r] + (m.st.pending[r] if m.live else 0)


cdef inline bint _candidate(const ModelC* m, int r) noexcept nogil:
    cdef Py_ssize_t i
    if m.s.status[r] != 0 or not m.s.region_up[m.f.replica_region[r]]:
        return False
    if m.version >= 0 and m.f.replica_version[r] != m.version:
        return False
    for i in range(m.req.n_exclude):
        if m.req.exclude[i] == r:
            return False
    return True


cdef inline bint _admitted(const ModelC* m, int r) noexcept nogil:
    return <double>_load(m, r) < m.req.ceiling * <double>m.f.decode_slots[r]


cdef inline void _predict(const ModelC* m, int r, int64_t load, PickC* out) noexcept nogil:
    cdef const FleetC* f = m.f
    cdef const SnapC* s = m.s
    cdef const ReqC* req = m.req
    cdef int64_t slots = f.decode_slots[r]
    cdef int64_t extra = load + 1 - slots
    cdef int64_t batch = load + 1
    cdef int64_t cached
    if extra < 0:
        extra = 0
    if batch > slots:
        batch = slots
    out.network = f.rtt_ms[req.origin * f.n_locations + f.replica_region[r]]
    out.queue = <double>(s.queue_depth[r] + extra) * s.service_ms[r] / <double>slots
    cached = <int64_t>m.matched[r - m.first] * req.block_tokens
    if cached > req.prompt_tokens:
        cached = req.prompt_tokens
    out.cached = cached
    out.prefill = f.prefill_base_ms[r] + s.prefill_ms_per_token[r] * <double>(req.prompt_tokens - cached)
    out.decode = s.tpot_base_ms[r] + s.tpot_ms_per_batch[r] * <double>batch
    out.ttft = out.network + out.queue + out.prefill + out.decode


cdef inline double _ttft(const ModelC* m, int r, int64_t load) noexcept nogil:
    cdef PickC tmp
    _predict(m, r, load, &tmp)
    return tmp.ttft


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


cdef inline bint _under_bound(const ModelC* m, int r, int64_t region_load, int64_t region_replicas) noexcept nogil:
    cdef double capacity = ceil(m.f.load_bound * <double>(region_load + 1) / <double>region_replicas)
    return <double>(_load(m, r) + 1) <= capacity


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


cdef int _model_open(ModelC* m, const FleetC* f, const SnapC* s, const StateC* st, const ReqC* req,
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
    m.matched = <int32_t*>calloc(<size_t>(m.last - m.first + 1), sizeof(int32_t))
    if m.matched == NULL:
        return -1
    _prefix_match(st, req, m.first, m.last, m.matched)
    return 0


cdef inline void _no_target(PickC* pick) noexcept nogil:
    pick.replica = -1
    pick.network = 0.0
    pick.queue = 0.0
    pick.prefill = 0.0
    pick.decode = 0.0
    pick.ttft = 0.0
    pick.cached = 0
    pick.n_fallbacks = 0


cdef void _choose(const ModelC* m, double b_local, double b_cross, PickC* pick) noexcept nogil:
    cdef const FleetC* f = m.f
    cdef const SnapC* s = m.s
    cdef const StateC* st = m.st
    cdef const ReqC* req = m.req
    cdef int n_regions = f.n_regions
    cdef int home = req.home
    cdef int64_t load_sum[MAX_REGIONS]
    cdef int64_t slot_sum[MAX_REGIONS]
    cdef int64_t n_ok[MAX_REGIONS]
    cdef bint accepts[MAX_REGIONS]
    cdef int best[MAX_REGIONS]
    cdef double best_ttft[MAX_REGIONS]
    cdef double ranked_ttft[MAX_RANKED]
    cdef int ranked_rep[MAX_RANKED]
    cdef int n_ranked = 0
    cdef int keep = f.max_fallbacks + 1
    cdef int r, g, at, j, target, chosen, action, reason
    cdef int64_t load, slots, k
    cdef double pair, total, ttft, wait, budget
    cdef bint eligible

    pick.action = -1
    pick.reason = -1
    _no_target(pick)
    pick.budget = 0.0
    pick.any_candidate = False
    pick.wait_replica = -1
    pick.wait_ms = INFINITY
    pick.wait_load = 0

    # Pass 1: each region's load over its usable replicas of this model.
    for g in range(n_regions):
        load_sum[g] = 0
        slot_sum[g] = 0
        n_ok[g] = 0
        accepts[g] = False
        best[g] = -1
        best_ttft[g] = INFINITY
    for r in range(m.first, m.last):
        g = f.replica_region[r]
        if s.status[r] != 0 or not s.region_up[g]:
            continue
        load_sum[g] += _load(m, r)
        slot_sum[g] += f.decode_slots[r]
        n_ok[g] += 1
    for g in range(n_regions):
        if g == home or slot_sum[g] == 0:
            continue
        if not (<double>load_sum[g] < f.spill_ceiling * <double>slot_sum[g]):
            continue
        pair = s.spill_pair[home * n_regions + g]
        total = s.spill_total[g]
        if m.live:
            pair -= st.spill_pair[home * n_regions + g]
            total -= st.spill_total[g]
        accepts[g] = pair >= 1.0 and total >= 1.0

    # Pass 2: predictions, the best replica per region, the retry list.
    for r in range(m.first, m.last):
        if not _candidate(m, r):
            continue
        pick.any_candidate = True
        g = f.replica_region[r]
        load = _load(m, r)
        slots = f.decode_slots[r]
        if not (<double>load < req.ceiling * <double>slots):
            if g == home:
                k = <int64_t>floor(<double>load - req.ceiling * <double>slots) + 1
                wait = <double>k * s.service_ms[r] / <double>slots
                if wait < pick.wait_ms:
                    pick.wait_ms = wait
                    pick.wait_replica = r
                    pick.wait_load = load - k
            continue
        ttft = _ttft(m, r, load)
        if g == home:
            eligible = ttft <= b_cross
        else:
            eligible = accepts[g] and ttft <= b_cross
        if (g == home or eligible) and ttft < best_ttft[g]:
            best_ttft[g] = ttft
            best[g] = r
        if eligible:
            at = n_ranked
            while at > 0 and ranked_ttft[at - 1] > ttft:
                at -= 1
            if at < keep:
                j = n_ranked if n_ranked < keep else keep - 1
                while j > at:
                    ranked_ttft[j] = ranked_ttft[j - 1]
                    ranked_rep[j] = ranked_rep[j - 1]
                    j -= 1
                ranked_ttft[at] = ttft
                ranked_rep[at] = r
                if n_ranked < keep:
                    n_ranked += 1

    chosen = -1
    action = -1
    reason = -1
    budget = 0.0
    # Home region: the affinity home while under its bound, else the fastest.
    if req.has_key:
        r = _ring_home(m, home)
        if r >= 0 and _under_bound(m, r, load_sum[home], n_ok[home]) and _ttft(m, r, _load(m, r)) <= b_local:
            chosen, action, reason, budget = r, SERVE, R_AFFINITY, b_local
    if chosen < 0 and best[home] >= 0 and best_ttft[home] <= b_local:
        chosen, action, reason, budget = best[home], SERVE, R_LEAST_TTFT, b_local
    # Overflow: the remote region with the lowest predicted TTFT within budget.
    if chosen < 0:
        target = -1
        for g in range(n_regions):
            if g == home or best[g] < 0:
                continue
            if target < 0 or best_ttft[g] < best_ttft[target] or (
                best_ttft[g] == best_ttft[target]
                and f.rtt_ms[req.origin * f.n_locations + g] < f.rtt_ms[req.origin * f.n_locations + target]
            ):
                target = g
        if target >= 0:
            chosen, action, reason, budget = best[target], OVERFLOW, R_SPILL_LEAST_TTFT, b_cross
            if req.has_key:
                r = _ring_home(m, target)
                if r >= 0 and _under_bound(m, r, load_sum[target], n_ok[target]) and _ttft(m, r, _load(m, r)) <= b_cross:
                    chosen = r
                    reason = R_SPILL_AFFINITY
    # Within the user-facing SLA at home, outside the routing target.
    if chosen < 0 and best[home] >= 0 and best_ttft[home] <= b_cross:
        chosen, action, reason, budget = best[home], SERVE, R_LOCAL_DEGRADED, b_cross

    if chosen >= 0:
        _predict(m, chosen, _load(m, chosen), pick)
        pick.action = action
        pick.reason = reason
        pick.replica = chosen
        pick.budget = budget
        for j in range(n_ranked):
            if ranked_rep[j] != chosen and pick.n_fallbacks < f.max_fallbacks:
                pick.fallbacks[pick.n_fallbacks] = ranked_rep[j]
                pick.n_fallbacks += 1


cdef inline int64_t _retry(const FleetC* f, double wait_ms) noexcept nogil:
    cdef int64_t ms = <int64_t>ceil(wait_ms)
    return ms if ms > f.min_retry_after_ms else f.min_retry_after_ms


cdef int _decide(const FleetC* f, const SnapC* s, const StateC* st, int64_t state_epoch, const ReqC* req,
                 int model, int version, PickC* out, int* out_model, int64_t* retry) noexcept nogil:
    """Fill ``out``; returns -1 when out of memory, 0 otherwise."""
    cdef ModelC main
    cdef ModelC small
    cdef PickC alt
    cdef double b_local, b_cross, fb_local, fb_cross, wait
    cdef bint queue_full = False
    cdef bint any_candidate
    cdef int r, fallback
    out_model[0] = model
    retry[0] = -1
    if _model_open(&main, f, s, st, req, state_epoch, model, version) < 0:
        return -1
    _budgets(&main, &b_local, &b_cross)
    _choose(&main, b_local, b_cross, out)
    if out.replica >= 0:
        free(main.matched)
        return 0

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
                free(main.matched)
                return 0
            queue_full = True
    free(main.matched)

    # Degrade: the fallback model, any version, when it can serve now.
    fallback = f.fallback_model[model]
    any_candidate = out.any_candidate
    if fallback >= 0:
        if _model_open(&small, f, s, st, req, state_epoch, fallback, -1) < 0:
            return -1
        _budgets(&small, &fb_local, &fb_cross)
        _choose(&small, fb_local, fb_cross, &alt)
        free(small.matched)
        any_candidate = any_candidate or alt.any_candidate
        if alt.replica >= 0:
            wait = out.wait_ms
            out[0] = alt
            out.action = DEGRADE
            out.reason = R_FALLBACK_MODEL
            out_model[0] = fallback
            return 0

    wait = out.wait_ms if out.wait_replica >= 0 else <double>f.default_retry_after_ms
    out.action = SHED
    if not any_candidate:
        out.reason = R_NO_REPLICA
    elif queue_full:
        out.reason = R_QUEUE_FULL
    else:
        out.reason = R_OVER_BUDGET
    _no_target(out)
    out.budget = b_cross
    retry[0] = _retry(f, wait)
    return 0


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
    cdef int rc
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
    req.home = sv.f.home[origin]
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
    req.local_budget = sv.f.class_local_budget_ms[priority]
    req.cross_budget = sv.f.class_cross_budget_ms[priority]
    req.ceiling = sv.f.class_slot_ceiling[priority]
    with nogil:
        rc = _decide(&sv.f, &sv.s, &tv.st, state_epoch, &req, model, version, &out, &out_model, &retry)
    if rc < 0:
        raise MemoryError()
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
