# The Envoy picker's stream kernel: one ext_proc stream of the native transport
# (EndpointPicker.native_stream) with the common request - a STREAMED body and a
# plain route (serve, overflow or degrade to the model asked for, the answer not
# shortened) - handled without the interpreter: the message read from its bytes
# (procmsg), the body scanned, the prompt's block hashes into a buffer of the
# stream's, the router's C entry point (Boundary.route_plain_c), the answers the
# picker built once, and the release through Boundary.release_c - at the response
# headers, or from the request's access log entry (EndpointPicker.wait_for_log
# keeps the stream's finish for it).
#
# Its twin is the picker's Python handler (EndpointPicker._handler), and the two
# share the stream's state (the picker's _Exchange): anything else - another body
# mode, a bad header or body, an unknown model, a version pin, a queue, a shed, an
# edited body, a fallback that served - is handed to the Python handler, at a point
# where what the kernel did is what the Python handler would have done; once the
# kernel has routed, the hand-over gives the exchange the Decision it would have
# had. tests/test_pickstream.py holds the two together, message by message.
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

from .common cimport chain_hashes
from .decide cimport MAX_PREFIX_BLOCKS, Boundary, PickC, ReqC

import time

import msgspec

from geoserve._core.procmsg import read as read_message
from geoserve._twin.bodyscan import BodyError
from geoserve._twin.procmsg import REQUEST_BODY, REQUEST_HEADERS, RESPONSE_HEADERS

cdef object E = None  # geoserve.integrations.envoy, imported at the first stream (it imports this module)
cdef object Reject, ORIGIN, PRIORITY, SESSION, VERSION, KEYS, CONTINUE_BODY, CONTINUE_RESPONSE_HEADERS
cdef int64_t BLOCK_BYTES, BLOCK_TOKENS, PER_TOKEN, STREAMED, NONE_MODE


cdef int _bind() except -1:
    global E, Reject, ORIGIN, PRIORITY, SESSION, VERSION, KEYS, CONTINUE_BODY, CONTINUE_RESPONSE_HEADERS
    global BLOCK_BYTES, BLOCK_TOKENS, PER_TOKEN, STREAMED, NONE_MODE
    from geoserve.integrations import envoy
    from geoserve.integrations import common
    from geoserve import prefix
    Reject = common.Reject
    ORIGIN, PRIORITY, SESSION, VERSION = (common.ORIGIN_HEADER, common.PRIORITY_HEADER, common.SESSION_HEADER,
                                          common.VERSION_HEADER)
    PER_TOKEN = common.CHARS_PER_TOKEN
    KEYS = envoy._READ_HEADERS
    CONTINUE_BODY = envoy._CONTINUE_BODY
    CONTINUE_RESPONSE_HEADERS = envoy._CONTINUE_RESPONSE_HEADERS
    STREAMED = envoy.STREAMED
    NONE_MODE = envoy._MODES.NONE
    BLOCK_BYTES = prefix.TEXT_BLOCK_BYTES
    BLOCK_TOKENS = prefix.TEXT_BLOCK_TOKENS
    E = envoy
    return 0


cdef class Stream:
    """``Stream(picker, exchange)``: the native transport's handler for one stream
    (what ``EndpointPicker._handler(exchange)`` is, compiled for the common request)."""

    cdef object picker
    cdef object ex
    cdef object python  # the Python handler, once the stream is handed over
    cdef Boundary boundary  # the one that routed
    cdef bint routed
    cdef PickC out
    cdef ReqC req
    cdef int out_model
    cdef int64_t retry
    cdef int64_t epoch
    cdef object replica_id
    cdef uint64_t* hashes
    cdef Py_ssize_t capacity

    def __cinit__(self, picker, ex):
        if E is None:
            _bind()
        self.picker = picker
        self.ex = ex
        self.python = None
        self.routed = False
        self.capacity = max(<Py_ssize_t>picker.prefix_blocks, 1)
        self.hashes = <uint64_t*>malloc(self.capacity * sizeof(uint64_t))
        if self.hashes == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.hashes)

    def __call__(self, data):
        if self.python is not None:
            return self.python(data)
        if data is None:
            self._close()
            return None
        try:
            return self._message(data)
        except Exception:
            self.picker._failed()
            raise

    # ------------------------------------------------------------ hand-over
    cdef object _hand_over(self, data):
        """The Python handler takes the stream from here, with ``data`` (the
        message the kernel does not answer) if any."""
        cdef object handler
        if self.routed:
            self._python_decision()
        handler = self.python = self.picker._handler(self.ex)
        return handler(data)

    cdef _python_decision(self):
        """The exchange gets the Decision the Python handler would have made."""
        self.ex.decision = self.boundary._decision(self.picker._request(self.ex, 0.0), &self.out, self.out_model,
                                                   self.retry, self.epoch, &self.req)

    # ------------------------------------------------------------ a message
    cdef object _message(self, bytes data):
        cdef object message = read_message(data, KEYS)
        cdef int kind = message.kind
        if self.routed:
            if message.modes is not None:
                return self._hand_over(data)
            if kind == RESPONSE_HEADERS:
                return self._response_headers(data, message)
            if kind == REQUEST_BODY:  # (the transport's standing answer, if asked)
                return [CONTINUE_BODY], False
            return self._hand_over(data)
        ex = self.ex
        if message.modes is not None:
            mode, response_mode, early = message.modes
            if mode != STREAMED or not early:
                return self._hand_over(data)
            ex.mode, ex.response_body_mode = mode, response_mode
        if ex.mode != STREAMED or ex.decision is not None or ex.holding:
            return self._hand_over(data)
        if kind == REQUEST_HEADERS:
            return self._headers(data, message)
        if kind == REQUEST_BODY:
            return self._body(data, message)
        return self._hand_over(data)

    cdef object _headers(self, bytes data, message):
        # EndpointPicker._on_headers for STREAMED: held, nothing answered
        cdef object ex = self.ex
        cdef dict headers = message.headers
        length = headers.get("content-length")
        if message.end_of_stream:
            return self._hand_over(data)
        if length is not None:
            try:
                length = int(length)
            except ValueError:
                return self._hand_over(data)
            if length > self.picker.max_body_bytes:
                return self._hand_over(data)
        ex.headers = headers
        if length is not None:
            ex.content_length = length
        return [], False

    cdef object _body(self, bytes data, message):
        # EndpointPicker._on_body up to the decision (_take), then the plain route
        cdef object ex = self.ex
        cdef object picker = self.picker
        cdef bytes chunk = message.body
        cdef bint end = message.end_of_stream
        if ex.body_bytes + len(chunk) > picker.max_body_bytes:
            return self._hand_over(data)  # the Python handler answers 413
        ex.owed.append((chunk, end))
        ex.body_bytes += len(chunk)
        scanner = ex.scanner
        try:
            scanner.feed(chunk, end)
        except BodyError as err:
            return picker._native(ex, iter([picker._reject(ex, Reject(400, str(err)))]))
        try:
            if end:
                if scanner.model is None:
                    picker._ready(ex, end)  # raises the Python handler's answer
                try:
                    msgspec.json.decode(scanner.buffer)
                except msgspec.DecodeError:
                    picker._check_json(ex)  # raises the Python handler's answer
            elif scanner.model is None or scanner.prompt_span is None or (
                    scanner.prompt_span[1] is None and scanner.prompt_length() < picker.prefix_blocks * BLOCK_BYTES):
                return [], False
        except Reject as reject:
            return picker._native(ex, iter([picker._reject(ex, reject)]))
        if self._route(scanner):
            return self._routed_answers()
        answers = picker._native(ex, self._decide_in_python(end))  # nothing recorded: the Python handler decides
        self.python = picker._handler(ex)
        return answers

    def _decide_in_python(self, bint end):
        return (yield from (yield from self.picker._decide_body(self.ex, end)))

    # ------------------------------------------------------------ the plain route
    cdef bint _route(self, scanner) except -1:
        """Route the request as EndpointPicker._request and Router.route would,
        recording it only if the route is plain; False (nothing recorded) for the
        Python handler to decide."""
        cdef object picker = self.picker
        cdef object ex = self.ex
        cdef dict headers = ex.headers
        cdef Boundary boundary
        cdef int ids[4]
        cdef ReqC* req = &self.req
        cdef int recorded
        cdef Py_ssize_t blocks, size
        cdef int64_t total, count
        cdef bytes prompt
        snapshot = picker.snapshot
        boundary = picker.router._boundary
        if snapshot is None or boundary is None or snapshot.fleet is not boundary.fleet or headers.get(VERSION):
            return False
        model = scanner.model
        if not boundary.resolve_names(model, headers.get(ORIGIN) or picker.region,
                                      headers.get(PRIORITY) or "interactive", ids):
            return False
        if boundary.model_names[ids[0]] != model:  # an alias or model@version: the body is rewritten
            return False
        max_tokens = scanner.max_tokens or 256
        if type(max_tokens) is not int or not 0 <= max_tokens <= 2147483648:
            return False
        total = ex.content_length if ex.content_length is not None else len(scanner.buffer)
        count = total // PER_TOKEN
        if count > 2147483648:
            return False
        req.origin = ids[2]
        req.priority = ids[3]
        req.prompt_tokens = count if count > 1 else 1
        req.max_tokens = max_tokens
        req.block_tokens = BLOCK_TOKENS
        req.waited_ms = 0.0
        req.exclude = NULL
        req.n_exclude = 0
        prompt = scanner.prompt_bytes()
        size = PyBytes_GET_SIZE(prompt)
        blocks = size // BLOCK_BYTES
        if blocks > picker.prefix_blocks:
            blocks = picker.prefix_blocks
        if blocks:
            size = blocks * BLOCK_BYTES
        elif scanner.prompt_span is None or scanner.prompt_span[1] is None:
            size = 0  # an unfinished prompt under one block: no block yet
        if (size + BLOCK_BYTES - 1) // BLOCK_BYTES > MAX_PREFIX_BLOCKS:
            return False
        req.n_prefix = chain_hashes(PyBytes_AS_STRING(prompt), size, BLOCK_BYTES, self.hashes)
        req.prefix = self.hashes
        if not boundary.ring_key(headers.get(SESSION) or None, req):
            return False
        recorded = boundary.route_plain_c(snapshot, req, ids[0], ids[1], &self.out, &self.out_model, &self.retry,
                                          &self.epoch)
        if not recorded:
            return False
        self.routed = True
        self.boundary = boundary
        self.replica_id = boundary.replica_ids[self.out.replica]
        return True

    cdef object _routed_answers(self):
        # EndpointPicker._route_answers (STREAMED, nothing to edit) and _native's standing answers
        cdef Boundary boundary = self.boundary
        cdef object picker = self.picker
        cdef object ex = self.ex
        cdef int i
        cdef list endpoints = boundary.endpoints
        metrics = picker.metrics
        if metrics is not None:
            metrics.decisions.inc(boundary.action_names[self.out.action], boundary.reason_names[self.out.reason])
            metrics.decide_seconds.observe(time.perf_counter() - ex.started)
        fallbacks = tuple([endpoints[self.out.fallbacks[i]] for i in range(self.out.n_fallbacks)])
        answers = ([picker._routed_answer(endpoints[self.out.replica], fallbacks,
                                          boundary.replica_version_names[self.out.replica])]
                   + [CONTINUE_BODY] * len(ex.owed))
        ex.owed = []
        ex.standing = True
        return answers, False, picker._standing_for(False)

    # ------------------------------------------------------------ the response
    cdef object _response_headers(self, bytes data, message):
        # EndpointPicker._on_response_headers
        cdef object ex = self.ex
        cdef object picker = self.picker
        try:
            status = int(message.headers.get(":status") or 0)
        except ValueError:
            status = 0
        served = picker.replica_at(message.upstream) if message.upstream is not None else None
        if ex.response_body_mode == NONE_MODE or message.end_of_stream:
            if served is not None and served != self.replica_id and status < 500:
                return self._hand_over(data)  # served by a fallback: the router records its prefix there
            if not self._release(status < 500):
                return self._hand_over(data)
        return [CONTINUE_RESPONSE_HEADERS], False

    cdef bint _release(self, bint ok) except -1:
        # EndpointPicker._release -> Router.complete -> Boundary.fast_complete (served
        # by the routed replica or not at all), on the router's current boundary;
        # False where fast_complete declines (the Python handler releases)
        cdef object ex = self.ex
        cdef Boundary boundary = self.picker.router._boundary
        cdef int r = self.out.replica
        if ex.released:
            return True
        if boundary is None or r >= boundary.n_replicas:
            return False
        ex.released = True
        if boundary.replica_ids[r] != self.replica_id:
            r = -1  # routed on another fleet (a membership change since): nothing of it is here
        boundary.release_c(self.out.action, r, self.epoch, -1, self.out.prefill)
        metrics = self.picker.metrics
        if metrics is not None:
            metrics.released.inc("true" if ok else "false")
        return True

    cdef object _close(self):
        # EndpointPicker._close
        if self.routed and not self.ex.released and self.picker.wait_for_log(self.ex, self.finish):
            pass  # released when the response has ended (its access log entry), by finish()
        elif self.routed and not self._release(True):
            return self._hand_over(None)
        metrics = self.picker.metrics
        if metrics is not None:
            metrics.active.dec()
        return None

    def finish(self, bint ok, served):
        """The release of a routed request from its access log entry, after the
        stream has ended (EndpointPicker._release with the served replica)."""
        if (served is None or served == self.replica_id or not ok) and self._release(ok):
            return
        self._python_decision()  # served by a fallback (its prefix recorded there), or declined: as in Python
        self.picker._release(self.ex, ok, served)
