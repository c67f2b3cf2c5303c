# The compiled router's C entry points, for compiled callers in the same process
# (the simulator's engine): a request as a struct in, a pick as a struct out, no
# Python objects per call. Python callers use Router.route/complete, which go
# through the same methods after validating a Request.
from libc.stdint cimport int32_t, int64_t, uint64_t

cdef enum:
    SERVE = 0
    OVERFLOW = 1
    QUEUE = 2
    DEGRADE = 3
    SHED = 4

cdef enum:
    MAX_RANKED = 17  # Policy.max_fallbacks <= 16, plus the primary
    MAX_EXCLUDE = 64
    MAX_PREFIX_BLOCKS = 65536


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
    double spill_need
    int64_t max_tokens  # the output limit asked for
    int64_t max_tokens_cap  # the class's cap on a degrade (0: none)


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
    int wait_replica
    double wait_ms
    int64_t wait_load


cdef inline int64_t shortened(int action, const ReqC* req) noexcept nogil:
    # router._shortened: the output limit a degrade applies (the class's cap, when
    # shorter than the request's), else 0
    if action == DEGRADE and 0 < req.max_tokens_cap < req.max_tokens:
        return req.max_tokens_cap
    return 0


cdef class Boundary:
    cdef object router
    cdef object fleet
    cdef object decision_cls
    cdef dict model_refs
    cdef list versions_by_model
    cdef dict locations
    cdef dict priorities
    cdef dict replica_index
    cdef list replica_ids
    cdef list endpoints
    cdef list replica_region_names
    cdef list replica_version_names
    cdef list model_names
    cdef list home_region_names
    cdef tuple action_names
    cdef tuple reason_names
    cdef int64_t ring_key_tokens
    cdef int n_replicas
    cdef int n_regions
    cdef dict action_codes
    cdef dict region_index
    cdef object state  # the router's own state (the boundary is rebuilt when it changes)
    cdef object acquire
    cdef object release_lock

    cdef int _state(self, state) except -1
    cdef int _resolve(self, request, snapshot, ReqC* req, int* model, int* version, int32_t* exclude) except -1
    cdef object _decision(self, request, const PickC* out, int out_model, int64_t retry, int64_t epoch,
                          const ReqC* req)
    cpdef object fast_decide(self, request, snapshot, state)
    cpdef object fast_route(self, request, snapshot)
    cpdef object fast_complete(self, decision, replica, ok)

    # The C entry points. ``resolve_names``: the model reference (name, name@version
    # or alias), origin and priority as indices into ``ids`` [model, version,
    # origin, priority]; 0 if one is unknown. ``ring_key``: the consistent-hash key
    # of a session (a str) or, without one, of the prefix. ``route_c``: fills the
    # class budgets of ``req`` (origin, priority, prompt, output limit, prefix, block
    # size, exclusions and waited time set by the caller), decides and records under the
    # state's lock like Router.route; ``epoch`` is the snapshot's. ``release_c``:
    # what Router.complete gives back (``home``: the origin's home region, for queue).
    # ``route_plain_c``: route_c recording only a plain route (the asked model, no
    # shorter answer; 1), else recording nothing (0) - for a caller whose fast path
    # covers that case only (the Envoy picker's stream kernel).
    cdef int resolve_names(self, model, origin, priority, int* ids) except -1
    cdef int ring_key(self, session, ReqC* req) except -1
    cdef int route_c(self, snapshot, ReqC* req, int model, int version, PickC* out, int* out_model, int64_t* retry,
                     int64_t* epoch) except -1
    cdef int route_plain_c(self, snapshot, ReqC* req, int model, int version, PickC* out, int* out_model,
                           int64_t* retry, int64_t* epoch) except -1
    cdef int _route_c(self, snapshot, ReqC* req, int model, int version, PickC* out, int* out_model, int64_t* retry,
                      int64_t* epoch, bint plain_only) except -1
    cdef int release_c(self, int action, int replica, int64_t epoch, int home, double prefill_ms) except -1
