# distutils: language = c++
# cython: language_level=3
"""The simulator's event loop and replica model, compiled: the twin of
``geoserve/sim/engine.py`` and ``geoserve/sim/replica.py``.

Same events, same keys ``(time, kind, seq)``, the same float expressions in the
same order, the same canonical orders (an outage drops requests by id), so both
engines produce byte-identical reports (``tests/test_sim_engines.py``). Policies
stay Python objects and are called exactly where the Python engine calls them,
except one: when geoserve's policy has nothing of its own between the engine and
the router (no resilience guard), the engine calls the router's compiled boundary
through its C entry points (``_core/decide.pxd``: the same decide-and-record and
release as ``Router.route``/``complete``, without a Request and a Decision object
per call), exactly where the policy would have called it;
requests stay ``SimRequest`` objects, whose fields the policies read are kept
current (``replica`` before ``complete``, ``tried`` after a failure) and the rest
(outcome, latencies, ``attempts``, ``queued``...) are written back at the end.
"""

cimport cython
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from libc.math cimport NAN, isnan
from libc.stdint cimport int32_t, int64_t, uint64_t
from libcpp.deque cimport deque
from libcpp.pair cimport pair
from libcpp.queue cimport priority_queue
from libcpp.unordered_set cimport unordered_set
from libcpp.vector cimport vector
from libcpp.algorithm cimport sort

from .common cimport mix64, prefetch
from .decide cimport Boundary, ReqC, PickC, MAX_EXCLUDE, MAX_PREFIX_BLOCKS, shortened
from .decide cimport SERVE as A_SERVE, OVERFLOW as A_OVERFLOW, QUEUE as A_QUEUE, DEGRADE as A_DEGRADE, SHED as A_SHED

cimport numpy as cnp
import numpy as np

cnp.import_array()

from geoserve.types import SignalColumns

cdef extern from "structmember.h":
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
    enum: T_OBJECT_EX

cdef extern from "Python.h":
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member

cdef enum:
    FAULT = 0
    SIGNAL = 1
    DELIVER = 2
    COMPLETE = 3
    PREFILL = 4
    FAIL = 5
    REACH = 6
    RETRY = 7
    ARRIVAL = 8

cdef enum:
    NONE = 0
    SERVED = 1
    OVERFLOWED = 2
    DEGRADED = 3
    SHED = 4
    LOST = 5

OUTCOMES = ("", "served", "overflowed", "degraded", "shed", "lost")

cdef enum:
    CACHE_MIN = 64  # slots of the smallest prefix cache (a power of two)
    CACHE_SLACK = 256  # blocks a prompt may add over the capacity before eviction, without a rehash
    CACHE_BUDGET = 16 << 20  # bytes of prefix-cache slots the fleet starts with, at most

ctypedef pair[double, pair[int64_t, int64_t]] Entry  # (-t, (-(kind << 40 | seq), seq))
ctypedef pair[double, pair[int64_t, int]] Decoder  # (-finish, (-seq, request))


cdef enum:
    A_LOST = 5  # a baseline's answer beside the router's actions (A_SERVE..A_SHED)

ACTIONS = {"serve": A_SERVE, "overflow": A_OVERFLOW, "queue": A_QUEUE, "degrade": A_DEGRADE, "shed": A_SHED, "lost": A_LOST}


# ---- a request's fields, at their slots
# A msgspec Struct keeps each field in an object slot at a fixed offset behind a
# member descriptor: ``q.prompt_tokens`` looks the name up on the type, finds the
# descriptor and reads the slot (PyMember_GetOne). The engine reads a dozen fields
# of every request and writes ten back, so it finds the offsets once and reads and
# writes the slots as those functions do - for a Struct that is neither frozen nor
# tracked by the garbage collector, whose setattr adds nothing to the slot write.
# Objects of any other type (a subclass, a stand-in) go through getattr/setattr.
cdef enum:
    F_ID, F_ARRIVAL, F_ORIGIN, F_PROMPT, F_OUTPUT, F_PREFIX, F_BLOCK_TOKENS, F_PRIORITY, F_MODEL, F_SESSION, \
        F_BLOCKS, F_OUTCOME, F_TTFT, F_COMPLETION, F_CACHED, F_OUTPUT_CAP, F_QUEUED, F_ATTEMPTS, F_REPLICA, \
        F_REGION, F_MODEL_USED, N_FIELDS

FIELD_NAMES = ("id", "arrival_ms", "origin", "prompt_tokens", "output_tokens", "prefix", "block_tokens", "priority",
               "model", "session", "blocks", "outcome", "ttft_ms", "completion_ms", "cached_tokens", "output_cap",
               "queued", "attempts", "replica", "region", "model_used")


@cython.final
cdef class Fields:
    cdef object cls
    cdef Py_ssize_t offset[N_FIELDS]

    def __init__(self, cls):
        cdef PyMemberDef* member
        assert len(FIELD_NAMES) == N_FIELDS
        config = getattr(cls, "__struct_config__", None)
        if config is None or config.frozen or config.gc:
            raise TypeError(f"{cls.__name__} is not a msgspec Struct with frozen=False, gc=False")
        self.cls = cls
        for f, name in enumerate(FIELD_NAMES):
            d = cls.__dict__.get(name)
            if type(d).__name__ != "member_descriptor":
                raise TypeError(f"{cls.__name__}.{name} is not a slot")
            member = (<PyMemberDescrObject*><PyObject*>d).d_member
            if member.type != T_OBJECT_EX:
                raise TypeError(f"{cls.__name__}.{name} is not an object slot")
            self.offset[f] = member.offset

    cdef inline object get(self, object obj, int f):
        cdef PyObject* v
        if type(obj) is self.cls:
            v = (<PyObject**>(<char*><PyObject*>obj + self.offset[f]))[0]
            if v != NULL:
                return <object>v
        return getattr(obj, FIELD_NAMES[f])

    cdef inline void set(self, object obj, int f, object value) except *:
        cdef PyObject** slot
        cdef PyObject* old
        if type(obj) is self.cls:
            slot = <PyObject**>(<char*><PyObject*>obj + self.offset[f])
            old = slot[0]
            Py_INCREF(value)
            slot[0] = <PyObject*>value
            Py_XDECREF(old)
        else:
            setattr(obj, FIELD_NAMES[f], value)


cdef Fields FIELDS = None  # SimRequest's, on first use (geoserve.sim imports this module)


cdef class Engine:
    # --- the simulation's Python side
    cdef object sim, policy, progress, reqs, fault_ops, deliveries
    cdef list replica_region_names, model_names
    # --- requests
    cdef vector[double] arrival, ttft, completion
    cdef vector[int64_t] prompt, output, block_tokens, cached, ids, cap  # cap: output the decision allowed (0: as asked)
    cdef vector[int] origin, attempts, replica, outcome, queued, region, model
    cdef vector[int64_t] blocks_at
    cdef vector[uint64_t] blocks
    # --- replicas
    cdef int n_rep
    cdef vector[int] r_region, r_slots, r_in_use, r_batch, r_model
    cdef vector[bint] r_alive
    cdef vector[double] r_slow, r_prefill_free_at, r_virtual, r_virtual_at, r_busy_since, r_busy_ms, r_last_signal
    cdef vector[int64_t] r_version, r_seq, r_served, r_cache_blocks
    cdef vector[uint64_t] r_clock
    cdef vector[deque[int]] r_waiting
    cdef vector[unordered_set[int]] r_prefilling
    cdef vector[priority_queue[Decoder]] r_decoding
    cdef vector[vector[uint64_t]] c_table  # per replica: the prefix cache's slots (see cache_slot)
    cdef vector[int64_t] c_size
    cdef vector[deque[pair[uint64_t, int]]] r_uses
    # --- latency models, by model index
    cdef vector[vector[double]] lat_x, lat_y
    cdef vector[double] lat_slope, lat_tpot_base, lat_tpot_batch
    # --- network, events
    cdef vector[double] one_way  # [origin * n_regions + region]
    cdef int n_regions
    cdef priority_queue[Entry] heap
    cdef vector[int64_t] ev_a, ev_b
    cdef int64_t seq, pending_work
    cdef double now, signal_interval, signal_delay, end_ms, max_age
    cdef int max_attempts
    cdef bint engine_timings
    cdef vector[double] prefill_rate
    # the router's C entry points (geoserve's policy without a guard), per request:
    # its names resolved once, its ring key, and what its last decision holds
    cdef Boundary direct
    cdef object router  # the policy's, whose snapshot the direct path takes itself
    cdef object snapshot  # the policy's, taken after each delivery
    cdef vector[int] d_model, d_version, d_origin, d_priority, d_action, d_replica, d_home
    cdef vector[bint] d_ok, d_has_key
    cdef vector[uint64_t] d_key
    cdef vector[int64_t] d_epoch
    cdef vector[double] d_prefill

    def __init__(self, sim, progress=None):
        global FIELDS
        if FIELDS is None:
            from geoserve.sim.demand import SimRequest
            FIELDS = Fields(SimRequest)
        self.sim = sim
        self.policy = sim.policy
        self.progress = progress
        self.reqs = sim.requests
        fleet = sim.fleet
        regions = list(fleet.topology.regions)
        self.n_regions = len(regions)
        self.replica_region_names = regions
        self.model_names = list(fleet.models)
        self.signal_interval = sim.scenario.signal_interval_ms
        self.max_attempts = sim.scenario.max_attempts
        self.engine_timings = sim.scenario.engine_timings
        for v in fleet.default_prefill_ms_per_token:
            self.prefill_rate.push_back(v)
        self.max_age = fleet.policy.signal_max_age_ms
        self.end_ms = sim.scenario.duration_s * 1000.0
        self.deliveries = {}
        cdef int g, o
        for o in range(len(fleet.locations)):
            for g in range(self.n_regions):
                self.one_way.push_back(sim.one_way[o][g])
        # requests
        cdef size_t n_req = len(self.reqs)
        self.ids.reserve(n_req); self.arrival.reserve(n_req); self.prompt.reserve(n_req)
        self.output.reserve(n_req); self.block_tokens.reserve(n_req); self.origin.reserve(n_req)
        self.blocks_at.reserve(n_req + 1); self.blocks.reserve(32 * n_req)
        self.ttft.assign(n_req, NAN); self.completion.assign(n_req, NAN); self.cached.assign(n_req, 0); self.cap.assign(n_req, 0)
        self.attempts.assign(n_req, 0); self.replica.assign(n_req, -1); self.outcome.assign(n_req, NONE)
        self.queued.assign(n_req, 0); self.region.assign(n_req, -1); self.model.assign(n_req, -1)
        cdef Fields fields = FIELDS
        location_index = fleet.location_index
        for q in self.reqs:
            self.ids.push_back(fields.get(q, F_ID))
            self.arrival.push_back(fields.get(q, F_ARRIVAL))
            self.prompt.push_back(fields.get(q, F_PROMPT))
            self.output.push_back(fields.get(q, F_OUTPUT))
            self.block_tokens.push_back(fields.get(q, F_BLOCK_TOKENS))
            self.origin.push_back(location_index[fields.get(q, F_ORIGIN)])
            self.blocks_at.push_back(self.blocks.size())
            self._add_blocks(q)
        self.blocks_at.push_back(self.blocks.size())
        # latency models: one per fleet model, read from the Python replicas' models
        cdef vector[double] xs, ys
        models = {}
        for rep in sim.replicas:
            m = int(fleet.replica_model[rep.index])
            if m not in models:
                models[m] = rep.latency
        for m in range(len(self.model_names)):
            lat = models.get(m)
            xs.clear()
            ys.clear()
            if lat is not None:
                for v in lat._x:
                    xs.push_back(v)
                for v in lat._y:
                    ys.push_back(v)
                self.lat_slope.push_back(lat._slope)
                self.lat_tpot_base.push_back(lat.tpot_base_ms)
                self.lat_tpot_batch.push_back(lat.tpot_ms_per_batch)
            else:
                self.lat_slope.push_back(0.0)
                self.lat_tpot_base.push_back(0.0)
                self.lat_tpot_batch.push_back(0.0)
            self.lat_x.push_back(xs)
            self.lat_y.push_back(ys)
        # replicas
        self.n_rep = len(sim.replicas)
        self.r_waiting.resize(self.n_rep)
        self.r_prefilling.resize(self.n_rep)
        self.r_decoding.resize(self.n_rep)
        self.c_table.resize(self.n_rep)
        self.r_uses.resize(self.n_rep)
        # prefix caches sized for their KV capacity up front (never rehashed while
        # they fill), within a budget for the whole fleet (a large fleet's start
        # small and double)
        cdef uint64_t most = CACHE_BUDGET // (16 * <uint64_t>max(1, self.n_rep)), first
        for rep in sim.replicas:
            self.r_region.push_back(rep.region)
            self.r_slots.push_back(rep.slots)
            self.r_model.push_back(int(fleet.replica_model[rep.index]))
            self.r_in_use.push_back(0)
            self.r_batch.push_back(0)
            self.r_alive.push_back(True)
            self.r_slow.push_back(1.0)
            self.r_prefill_free_at.push_back(0.0)
            self.r_virtual.push_back(0.0)
            self.r_virtual_at.push_back(0.0)
            self.r_busy_since.push_back(-1.0)
            self.r_busy_ms.push_back(0.0)
            self.r_last_signal.push_back(0.0)
            self.r_version.push_back(0)
            self.r_seq.push_back(0)
            self.r_served.push_back(0)
            self.r_cache_blocks.push_back(rep.cache_blocks)
            self.r_clock.push_back(0)
            self.c_size.push_back(0)
            first = CACHE_MIN
            while first < most and first < 2 * (<uint64_t>rep.cache_blocks + CACHE_SLACK):
                first *= 2
            self.c_table[rep.index].resize(2 * first, 0)
        self.fault_ops = sim.fault_schedule()
        boundary = getattr(self.policy, "boundary", None)
        if boundary is not None and self.max_attempts <= MAX_EXCLUDE:
            self._direct(boundary)

    cdef void _direct(self, Boundary b) except *:
        """Resolve every request's names once for the router's C entry points; a
        request they cannot take (a name the router does not know, odd counts) goes
        through the policy, which raises or answers as the Python boundary does."""
        cdef size_t n = len(self.reqs)
        cdef int q
        cdef int ids[4]
        cdef ReqC req
        cdef dict names = {}
        self.direct = b
        self.router = self.policy.router
        self.d_model.assign(n, -1); self.d_version.assign(n, -1); self.d_origin.assign(n, -1); self.d_priority.assign(n, -1)
        self.d_action.assign(n, -1); self.d_replica.assign(n, -1); self.d_home.assign(n, -1)
        self.d_ok.assign(n, False); self.d_has_key.assign(n, False); self.d_key.assign(n, 0)
        self.d_epoch.assign(n, 0); self.d_prefill.assign(n, 0.0)
        cdef Fields fields = FIELDS
        for q in range(<int>n):
            r = self.reqs[q]
            key = (fields.get(r, F_MODEL), fields.get(r, F_ORIGIN), fields.get(r, F_PRIORITY))
            got = names.get(key)
            if got is None:
                got = names[key] = (ids[0], ids[1], ids[2], ids[3]) if b.resolve_names(key[0], key[1], key[2], ids) else ()
            if not got or self.block_tokens[q] < 1 or not (0 <= self.prompt[q] <= 2147483648) \
                    or not (0 <= self.output[q] <= 2147483648) or self.blocks_at[q + 1] - self.blocks_at[q] > MAX_PREFIX_BLOCKS:
                continue
            self.d_model[q], self.d_version[q], self.d_origin[q], self.d_priority[q] = got
            self._fill(q, &req)
            if not b.ring_key(fields.get(r, F_SESSION), &req):
                continue
            self.d_key[q] = req.ring_key
            self.d_has_key[q] = req.has_key
            self.d_ok[q] = True

    cdef inline void _fill(self, int q, ReqC* req) noexcept:
        req.origin = self.d_origin[q]
        req.priority = self.d_priority[q]
        req.prompt_tokens = self.prompt[q]
        req.max_tokens = self.output[q]
        req.block_tokens = self.block_tokens[q]
        req.prefix = self.blocks.data() + self.blocks_at[q]
        req.n_prefix = self.blocks_at[q + 1] - self.blocks_at[q]
        req.ring_key = self.d_key[q]
        req.has_key = self.d_has_key[q]
        req.n_exclude = 0

    cdef void _add_blocks(self, q) except *:
        cdef const uint64_t* p
        cdef Py_ssize_t k
        prefix = FIELDS.get(q, F_PREFIX)
        if type(prefix) is cnp.ndarray and cnp.PyArray_TYPE(prefix) == cnp.NPY_UINT64 and cnp.PyArray_IS_C_CONTIGUOUS(prefix):
            p = <const uint64_t*>cnp.PyArray_DATA(prefix)
            self.blocks.insert(self.blocks.end(), p, p + cnp.PyArray_SIZE(prefix))
        else:
            for h in FIELDS.get(q, F_BLOCKS):
                self.blocks.push_back(h)

    # ---------------------------------------------------------------- events
    cdef void push(self, double t, int kind, int64_t a, int64_t b):
        self.seq += 1
        self.ev_a.push_back(a)
        self.ev_b.push_back(b)
        self.heap.push(Entry(-t, pair[int64_t, int64_t](-((<int64_t>kind << 40) | self.seq), self.seq)))
        if kind == RETRY or kind == FAIL or kind == REACH or kind == PREFILL or kind == COMPLETE:
            self.pending_work += 1

    def run(self):
        cdef int64_t i = 0, n = len(self.reqs), s
        cdef int kind
        cdef double t, top_t
        cdef int top_kind
        cdef int64_t tick = max(1, n // 50)
        for k, (ft, op, members, value) in enumerate(self.fault_ops):
            self.push(ft, FAULT, k, 0)
        self.push(0.0, SIGNAL, 0, 0)
        while i < n or not self.heap.empty():
            if not self.heap.empty():
                top_t = -self.heap.top().first
                top_kind = <int>((-self.heap.top().second.first) >> 40)
            if i < n and (self.heap.empty() or self.arrival[i] < top_t or (self.arrival[i] == top_t and top_kind > ARRIVAL)):
                i += 1
                if self.progress is not None and i % tick == 0:
                    self.progress(i / n)
                self._route(i - 1, self.arrival[i - 1])
                continue
            t = -self.heap.top().first
            kind = <int>((-self.heap.top().second.first) >> 40)
            s = self.heap.top().second.second
            self.heap.pop()
            if kind == RETRY or kind == FAIL or kind == REACH or kind == PREFILL or kind == COMPLETE:
                self.pending_work -= 1
            self.now = t
            if kind == COMPLETE:
                self._complete(<int>self.ev_a[s - 1], self.ev_b[s - 1], t)
            elif kind == PREFILL:
                self._prefill_done(<int>self.ev_a[s - 1], <int>self.ev_b[s - 1], t)
            elif kind == REACH:
                self._reach(<int>self.ev_a[s - 1], <int>self.ev_b[s - 1], t)
            elif kind == SIGNAL:
                self._signal(t)
                if t < self.end_ms or i < n or self._work_left():
                    self.push(t + self.signal_interval, SIGNAL, 0, 0)
            elif kind == DELIVER:
                columns, usable = self.deliveries.pop(s)
                self._deliver(columns, usable)
            elif kind == RETRY:
                self._route(<int>self.ev_a[s - 1], t)
            elif kind == FAIL:
                self._failed(<int>self.ev_a[s - 1], <int>self.ev_b[s - 1], t)
            elif kind == FAULT:
                self._fault(<int>self.ev_a[s - 1], t)
        self._write_back()
        if self.progress is not None:
            self.progress(1.0)

    cdef bint _work_left(self):
        cdef int r
        for r in range(self.n_rep):
            if self.r_in_use[r] or not self.r_waiting[r].empty():
                return True
        return self.pending_work > 0

    # ---------------------------------------------------------------- signals
    cdef void _signal(self, double t) except *:
        cdef int r, g, backlog
        cdef cnp.npy_intp n = self.n_rep
        cdef vector[int64_t] used_c = vector[int64_t](self.n_regions, 0)
        observed = cnp.PyArray_EMPTY(1, &n, cnp.NPY_FLOAT64, 0)
        healthy = cnp.PyArray_EMPTY(1, &n, cnp.NPY_BOOL, 0)
        running = cnp.PyArray_EMPTY(1, &n, cnp.NPY_INT32, 0)
        waiting = cnp.PyArray_EMPTY(1, &n, cnp.NPY_INT32, 0)
        usable = cnp.PyArray_EMPTY(1, &n, cnp.NPY_BOOL, 0)
        cdef double* obs = <double*>cnp.PyArray_DATA(observed)
        cdef unsigned char* ok = <unsigned char*>cnp.PyArray_DATA(healthy)
        cdef unsigned char* fresh_ok = <unsigned char*>cnp.PyArray_DATA(usable)
        cdef int32_t* run_v = <int32_t*>cnp.PyArray_DATA(running)
        cdef int32_t* wait_v = <int32_t*>cnp.PyArray_DATA(waiting)
        for r in range(self.n_rep):
            if self.r_alive[r]:
                self.r_last_signal[r] = t
            obs[r] = self.r_last_signal[r]
            ok[r] = self.r_alive[r]
            fresh_ok[r] = self.r_alive[r] and t - obs[r] <= self.max_age
            backlog = <int>self.r_prefilling[r].size() - (1 if (not self.r_prefilling[r].empty() and self.r_prefill_free_at[r] > t) else 0)
            run_v[r] = self.r_in_use[r] - backlog
            wait_v[r] = <int>self.r_waiting[r].size() + backlog
            used_c[self.r_region[r]] += self.r_in_use[r]
        timings = {}
        cdef double* tpot_v
        cdef double* rate_v
        if self.engine_timings:  # measured: the current step and the prefill rate, slowdowns included
            tpot = cnp.PyArray_EMPTY(1, &n, cnp.NPY_FLOAT64, 0)
            rate = cnp.PyArray_EMPTY(1, &n, cnp.NPY_FLOAT64, 0)
            tpot_v = <double*>cnp.PyArray_DATA(tpot)
            rate_v = <double*>cnp.PyArray_DATA(rate)
            for r in range(self.n_rep):
                tpot_v[r] = self.step_ms(r, self.r_batch[r])
                rate_v[r] = self.prefill_rate[r] * self.r_slow[r]
            timings = {"tpot_ms": tpot, "prefill_ms_per_token": rate}
        capacity = self.sim.capacity
        if capacity is not None:  # the same hook as the Python engine's
            accepting = capacity.on_signals(t, running, waiting)
            timings["draining"] = ~accepting
            usable &= accepting
        columns = SignalColumns(now_ms=t, observed_ms=observed, healthy=healthy, in_flight=running, queue_depth=waiting,
                                **timings)
        self.sim.slot_samples.append((t, [used_c[g] for g in range(self.n_regions)]))
        if self.signal_delay > 0:
            self.push(t + self.signal_delay, DELIVER, 0, 0)
            self.deliveries[self.seq] = (columns, usable)
        else:
            self._deliver(columns, usable)

    cdef void _deliver(self, columns, usable) except *:
        if self.direct is not None:  # geoserve's on_signals without a guard: the router's snapshot
            self.snapshot = self.policy.snapshot = self.router.snapshot(columns)
        else:
            self.policy.on_signals(columns, usable)

    # ---------------------------------------------------------------- replica model
    cdef double prefill_ms(self, int m, double tokens):
        cdef vector[double]* x = &self.lat_x[m]
        cdef vector[double]* y = &self.lat_y[m]
        cdef int n = x.size(), lo, hi, mid
        if tokens <= 0:
            return 0.0
        if tokens <= x[0][0]:
            return y[0][0]
        if tokens >= x[0][n - 1]:
            return y[0][n - 1] + self.lat_slope[m] * (tokens - x[0][n - 1])
        lo = 0
        hi = n
        while lo < hi:  # bisect_left
            mid = (lo + hi) // 2
            if x[0][mid] < tokens:
                lo = mid + 1
            else:
                hi = mid
        return y[0][lo - 1] + (y[0][lo] - y[0][lo - 1]) * (tokens - x[0][lo - 1]) / (x[0][lo] - x[0][lo - 1])

    cdef inline double step_ms(self, int r, int batch):
        cdef int m = self.r_model[r]
        return (self.lat_tpot_base[m] + self.lat_tpot_batch[m] * batch) * self.r_slow[r]

    cdef inline void advance(self, int r, double now):
        if self.r_batch[r]:
            self.r_virtual[r] += (now - self.r_virtual_at[r]) / self.step_ms(r, self.r_batch[r])
        self.r_virtual_at[r] = now

    # ---- the prefix cache: a map block hash -> stamp of its last use, as the Python
    # replica's dict; linear probing with backward-shift deletion over (key, stamp)
    # pairs side by side (stamp 0: empty), doubled at half full. Only membership,
    # stamps and size are observable, so any map gives the same run. Sized at the
    # start for the replica's capacity (see __init__): rehashing a table as it fills
    # cost as much as the lookups themselves.
    cdef inline int64_t cache_slot(self, int r, uint64_t key) noexcept:
        cdef uint64_t* t = self.c_table[r].data()
        cdef uint64_t mask = (self.c_table[r].size() >> 1) - 1
        cdef uint64_t i = mix64(key) & mask
        while t[2 * i + 1] != 0 and t[2 * i] != key:
            i = (i + 1) & mask
        return <int64_t>i

    cdef inline uint64_t cache_stamp(self, int r, int64_t i) noexcept:
        return self.c_table[r][2 * i + 1]

    cdef bint cache_set(self, int r, uint64_t key, uint64_t stamp) noexcept:
        """Stamp ``key`` (inserting it if absent); True if it was there."""
        cdef int64_t i = self.cache_slot(r, key)
        cdef uint64_t* t = self.c_table[r].data()
        cdef bint present = t[2 * i + 1] != 0
        if not present:
            self.c_size[r] += 1
            t[2 * i] = key
        t[2 * i + 1] = stamp
        if self.c_size[r] > <int64_t>(self.c_table[r].size() >> 2):
            self.cache_grow(r)
        return present

    cdef void cache_grow(self, int r) noexcept:
        cdef vector[uint64_t] old
        cdef size_t k
        old.swap(self.c_table[r])
        self.c_table[r].assign(2 * old.size(), 0)
        self.c_size[r] = 0
        for k in range(0, old.size(), 2):
            if old[k + 1] != 0:
                self.cache_set(r, old[k], old[k + 1])

    cdef void cache_erase(self, int r, int64_t i) noexcept:
        cdef uint64_t* t = self.c_table[r].data()
        cdef uint64_t mask = (self.c_table[r].size() >> 1) - 1
        cdef uint64_t hole = <uint64_t>i, j = <uint64_t>i, home
        while True:
            j = (j + 1) & mask
            if t[2 * j + 1] == 0:
                break
            home = mix64(t[2 * j]) & mask
            # entry j may move back into the hole unless its home lies in (hole, j]
            if (hole < j and hole < home <= j) or (hole > j and (home > hole or home <= j)):
                continue
            t[2 * hole] = t[2 * j]
            t[2 * hole + 1] = t[2 * j + 1]
            hole = j
        t[2 * hole + 1] = 0
        self.c_size[r] -= 1

    cdef void cache_clear(self, int r) noexcept:
        self.c_table[r].assign(self.c_table[r].size(), 0)
        self.c_size[r] = 0

    cdef int64_t cache_lookup(self, int r, int q):
        """Leading blocks of the prompt already cached; then every block is most recent
        (one probe per block: a block stamped here cannot end the leading run, which
        already ended at the first miss)."""
        cdef int64_t lo = self.blocks_at[q], hi = self.blocks_at[q + 1], k, hits = 0
        cdef bint leading = True
        cdef uint64_t stamp
        cdef uint64_t* t = self.c_table[r].data()
        cdef uint64_t mask = (self.c_table[r].size() >> 1) - 1
        for k in range(lo, lo + 64 if hi - lo > 64 else hi):  # independent misses: ask for all at once
            prefetch(&t[2 * (mix64(self.blocks[k]) & mask)])
        self.r_clock[r] += 1
        stamp = self.r_clock[r]
        for k in range(lo, hi):
            if self.cache_set(r, self.blocks[k], stamp) and leading:
                hits += 1
            else:
                leading = False
        self.r_uses[r].push_back(pair[uint64_t, int](stamp, q))
        if self.c_size[r] > self.r_cache_blocks[r]:
            self.evict(r)
        hits = hits * self.block_tokens[q]
        return hits if hits < self.prompt[q] else self.prompt[q]

    cdef void evict(self, int r):
        cdef deque[pair[uint64_t, int]]* uses = &self.r_uses[r]
        cdef pair[uint64_t, int] use
        cdef int64_t k, i
        cdef uint64_t* t
        cdef uint64_t mask
        while self.c_size[r] > self.r_cache_blocks[r] and not uses.empty():
            use = uses.front()
            uses.pop_front()
            t = self.c_table[r].data()
            mask = (self.c_table[r].size() >> 1) - 1
            for k in range(self.blocks_at[use.second], self.blocks_at[use.second + 1]):  # independent misses
                prefetch(&t[2 * (mix64(self.blocks[k]) & mask)])
            for k in range(self.blocks_at[use.second], self.blocks_at[use.second + 1]):
                i = self.cache_slot(r, self.blocks[k])
                if self.cache_stamp(r, i) == use.first:  # not used since: least recently used
                    self.cache_erase(r, i)

    cdef double start(self, int r, int q, double now):
        cdef double begin, end
        cdef int64_t c
        if self.r_in_use[r] == 0:
            self.r_busy_since[r] = now
        self.r_in_use[r] += 1
        self.r_prefilling[r].insert(q)
        c = self.cache_lookup(r, q)
        self.cached[q] = c
        begin = now if now > self.r_prefill_free_at[r] else self.r_prefill_free_at[r]
        end = begin + self.prefill_ms(self.r_model[r], <double>(self.prompt[q] - c)) * self.r_slow[r]
        self.r_prefill_free_at[r] = end
        return end

    cdef double admit(self, int r, int q, double now):
        if self.r_in_use[r] < self.r_slots[r]:
            return self.start(r, q, now)
        self.r_waiting[r].push_back(q)
        return -1.0

    cdef double join_decode(self, int r, int q, double now):
        self.r_prefilling[r].erase(q)
        self.advance(r, now)
        self.r_batch[r] += 1
        self.r_seq[r] += 1
        self.r_decoding[r].push(Decoder(-(self.r_virtual[r] + <double>(self.cap[q] if self.cap[q] > 0 else self.output[q])),
                                        pair[int64_t, int](-self.r_seq[r], q)))
        return now + self.step_ms(r, self.r_batch[r])

    cdef double next_completion(self, int r):
        cdef double finish, gap
        self.r_version[r] += 1
        if self.r_decoding[r].empty():
            return -1.0
        finish = -self.r_decoding[r].top().first
        gap = finish - self.r_virtual[r]
        return self.r_virtual_at[r] + (gap if gap > 0.0 else 0.0) * self.step_ms(r, self.r_batch[r])

    cdef void reschedule(self, int r):
        cdef double t_next = self.next_completion(r)
        if t_next >= 0:
            self.push(t_next, COMPLETE, r, self.r_version[r])

    # ---------------------------------------------------------------- requests
    cdef double back(self, int q):
        return self.one_way[self.origin[q] * self.n_regions + self.r_region[self.replica[q]]]

    cdef void _route(self, int q, double t) except *:
        cdef int r
        cdef double retry_after
        cdef int code
        self.attempts[q] += 1
        if self.direct is not None and self.d_ok[q]:
            code = self._route_direct(q, t, &r, &retry_after)
        else:
            req = self.reqs[q]
            action, r, retry_after = self.policy.route(req, t)
            self.cap[q] = req.output_cap
            code = ACTIONS[action]
            if code != A_QUEUE and code != A_SHED and code != A_LOST and r >= 0:
                req.replica = r
        if code == A_QUEUE:
            self.queued[q] += 1
            self.push(t + (retry_after if retry_after > 1.0 else 1.0), RETRY, q, 0)
            return
        if code == A_SHED or code == A_LOST or r < 0:
            self._terminal(q, SHED if code == A_SHED else LOST)
            return
        self.replica[q] = r
        self.region[q] = self.r_region[r]
        self.model[q] = self.r_model[r]
        self.outcome[q] = SERVED if code == A_SERVE else (OVERFLOWED if code == A_OVERFLOW else DEGRADED)
        self.push(t + self.one_way[self.origin[q] * self.n_regions + self.r_region[r]], REACH, q, self.attempts[q])

    cdef int _route_direct(self, int q, double t, int* r, double* retry_after) except -1:
        # geoserve's policy, route(): give back a queue slot held from an earlier
        # ask, then decide and record (Geoserve.route and Router.route, compiled).
        cdef ReqC req
        cdef PickC out
        cdef int out_model, k
        cdef int64_t retry, epoch
        cdef int32_t exclude[MAX_EXCLUDE]
        cdef tuple tried
        if self.d_action[q] == A_QUEUE:
            self.direct.release_c(A_QUEUE, -1, self.d_epoch[q], self.d_home[q], self.d_prefill[q])
        self._fill(q, &req)
        req.waited_ms = t - self.arrival[q]
        req.exclude = exclude
        if self.attempts[q] > 1:  # after a failure: never the replicas it failed on
            tried = self.reqs[q].tried
            for k in range(len(tried)):
                exclude[k] = tried[k]
            req.n_exclude = len(tried)
        self.direct.route_c(self.snapshot, &req, self.d_model[q], self.d_version[q], &out, &out_model, &retry,
                            &epoch)
        self.d_action[q] = out.action
        self.d_replica[q] = out.replica if out.replica >= 0 and out.action != A_QUEUE else -1
        self.d_epoch[q] = epoch
        self.d_home[q] = req.home
        self.d_prefill[q] = out.prefill
        self.cap[q] = shortened(out.action, &req)  # a degrade may shorten the answer
        r[0] = self.d_replica[q]
        retry_after[0] = <double>retry if retry > 0 else 0.0
        return out.action

    cdef void _release(self, int q, bint ok, double t) except *:
        # geoserve's policy, complete(): what a decision holding a replica gives back
        cdef int action
        if self.direct is not None and self.d_ok[q]:
            action = self.d_action[q]
            if action == A_SERVE or action == A_OVERFLOW or action == A_DEGRADE:
                self.direct.release_c(action, self.d_replica[q], self.d_epoch[q], -1, self.d_prefill[q])
        else:
            self.policy.complete(self.reqs[q], ok, t, self.ttft[q] if ok else NAN)

    cdef void _reach(self, int q, int attempt, double t) except *:
        cdef int r = self.replica[q]
        cdef double end
        if not self.r_alive[r]:
            self.push(t + self.back(q), FAIL, q, attempt)
            return
        end = self.admit(r, q, t)
        if end >= 0:
            self.push(end, PREFILL, q, attempt)

    cdef void _prefill_done(self, int q, int attempt, double t) except *:
        cdef int r = self.replica[q]
        cdef double first
        if self.attempts[q] != attempt or r < 0 or not self.r_prefilling[r].count(q):
            return
        first = self.join_decode(r, q, t)
        self.ttft[q] = first + self.back(q) - self.arrival[q]
        self.reschedule(r)

    cdef void _complete(self, int r, int64_t version, double t) except *:
        cdef vector[int] done
        cdef int q, k
        cdef double end
        if version != self.r_version[r]:
            return
        self.advance(r, t)
        while not self.r_decoding[r].empty() and -self.r_decoding[r].top().first <= self.r_virtual[r] + 1e-9:
            done.push_back(self.r_decoding[r].top().second.second)
            self.r_decoding[r].pop()
        self.r_batch[r] -= done.size()
        self.r_in_use[r] -= done.size()
        self.r_served[r] += done.size()
        if self.r_in_use[r] == 0 and self.r_busy_since[r] >= 0:
            self.r_busy_ms[r] += t - self.r_busy_since[r]
            self.r_busy_since[r] = -1.0
        for k in range(done.size()):
            q = done[k]
            self.completion[q] = t + self.back(q) - self.arrival[q]
            self._release(q, True, t)
        while not self.r_waiting[r].empty() and self.r_in_use[r] < self.r_slots[r]:
            q = self.r_waiting[r].front()
            self.r_waiting[r].pop_front()
            end = self.start(r, q, t)
            self.push(end, PREFILL, q, self.attempts[q])
        self.reschedule(r)

    cdef void _failed(self, int q, int attempt, double t) except *:
        if self.attempts[q] != attempt:
            return
        req = self.reqs[q]
        self._release(q, False, t)
        if not isnan(self.ttft[q]):  # failed after its first token: never retried
            self._terminal(q, LOST)
            return
        req.tried = req.tried + (self.replica[q],)
        if self.attempts[q] < self.max_attempts and self.policy.retry(req, t):
            self._route(q, t)
        else:
            self._terminal(q, LOST)

    cdef void _terminal(self, int q, int outcome) except *:
        self.outcome[q] = outcome
        self.replica[q] = -1
        self.reqs[q].replica = -1
        self.ttft[q] = NAN
        self.completion[q] = NAN

    # ---------------------------------------------------------------- faults
    cdef void _fault(self, int k, double t) except *:
        cdef int r
        _, op, members, value = self.fault_ops[k]
        if op == "delay":
            self.signal_delay = value
            return
        for r in members:
            if op == "down":
                self._down(r, t)
            elif op == "up":
                self.r_alive[r] = True
            else:
                self.advance(r, t)
                self.r_slow[r] = value
                self.reschedule(r)

    cdef void _down(self, int r, double t) except *:
        cdef vector[pair[int64_t, int]] dropped  # (request id, index)
        cdef int k, q
        if not self.r_alive[r]:
            return
        self.r_alive[r] = False
        for k in range(self.r_waiting[r].size()):
            q = self.r_waiting[r][k]
            dropped.push_back(pair[int64_t, int](self.ids[q], q))
        for q in self.r_prefilling[r]:
            dropped.push_back(pair[int64_t, int](self.ids[q], q))
        while not self.r_decoding[r].empty():
            q = self.r_decoding[r].top().second.second
            dropped.push_back(pair[int64_t, int](self.ids[q], q))
            self.r_decoding[r].pop()
        sort(dropped.begin(), dropped.end())  # by request id: the Python engine's order
        self.r_waiting[r].clear()
        self.r_prefilling[r].clear()
        self.r_batch[r] = 0
        self.r_version[r] += 1
        self.r_virtual_at[r] = t
        if self.r_busy_since[r] >= 0:
            self.r_busy_ms[r] += t - self.r_busy_since[r]
            self.r_busy_since[r] = -1.0
        self.r_in_use[r] = 0
        self.r_prefill_free_at[r] = t
        self.cache_clear(r)
        self.r_uses[r].clear()
        for k in range(dropped.size()):
            q = dropped[k].second
            self.push(t + self.back(q), FAIL, q, self.attempts[q])

    # ---------------------------------------------------------------- results
    cdef void _write_back(self) except *:
        cdef int q, r
        sim = self.sim
        cdef Fields fields = FIELDS
        for q in range(len(self.reqs)):
            req = self.reqs[q]
            fields.set(req, F_OUTCOME, OUTCOMES[self.outcome[q]])
            fields.set(req, F_TTFT, self.ttft[q])
            fields.set(req, F_COMPLETION, self.completion[q])
            fields.set(req, F_CACHED, self.cached[q])
            fields.set(req, F_OUTPUT_CAP, self.cap[q])
            fields.set(req, F_QUEUED, self.queued[q])
            fields.set(req, F_ATTEMPTS, self.attempts[q])
            fields.set(req, F_REPLICA, self.replica[q])
            if self.region[q] >= 0:
                fields.set(req, F_REGION, self.replica_region_names[self.region[q]])
                fields.set(req, F_MODEL_USED, self.model_names[self.model[q]])
        for r in range(self.n_rep):
            rep = sim.replicas[r]
            rep.busy_ms = self.r_busy_ms[r]
            rep.busy_since = self.r_busy_since[r]
            rep.served = self.r_served[r]
        sim.now = self.now
        sim.end_ms = self.now if self.now > self.end_ms else self.end_ms
