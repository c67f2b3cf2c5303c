# The compiled twin of geoserve._twin.bodyscan.BodyScanner: the same state machine
# over the top level of a streamed JSON object, with byte loops where the twin uses
# regular expressions. Same attributes, same values, same errors (messages
# included); tests/test_openai_body.py holds the two together. The rare and
# once-per-request steps (a key with escapes, the model string, max_tokens) call
# the twin's own decoding, so the two cannot disagree on JSON's details.
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE

from geoserve._twin.bodyscan import BodyError, PROMPT_KEYS, _decode_string

import json

cdef enum:
    OPEN = 0
    KEY = 1
    COLON = 2
    VALUE = 3
    NEST = 4
    NEXT = 5
    DONE = 6

cdef frozenset WANTED = frozenset(("model", "max_tokens", "max_completion_tokens") + PROMPT_KEYS)
cdef frozenset PROMPTS = frozenset(PROMPT_KEYS)


cdef inline Py_ssize_t skip_ws(const unsigned char* buf, Py_ssize_t pos, Py_ssize_t n) noexcept nogil:
    # [ \t\r\n]*
    while pos < n:
        c = buf[pos]
        if c != 0x20 and c != 0x09 and c != 0x0D and c != 0x0A:
            break
        pos += 1
    return pos


cdef inline Py_ssize_t string_rest(const unsigned char* buf, Py_ssize_t i, Py_ssize_t n,
                                    Py_ssize_t* stop) noexcept nogil:
    # (?:[^"\\]|\\.)*(")? from inside a string at i: the index after the closing
    # quote, or -1 when the string runs to the end of the buffer (more to come), with
    # *stop where the scan resumes then (the end, or a lone backslash there)
    while i < n:
        c = buf[i]
        if c == 0x22:
            return i + 1
        if c == 0x5C:
            if i + 1 >= n:
                break
            i += 2
        else:
            i += 1
    stop[0] = i
    return -1


cdef inline bint scalar_byte(unsigned char c) noexcept nogil:
    # [^,}\]\s]: \s of a bytes pattern is [ \t\n\r\f\v]
    return not (c == 0x2C or c == 0x7D or c == 0x5D or c == 0x20 or (0x09 <= c <= 0x0D))


cdef object string_of(const unsigned char* buf, Py_ssize_t start, Py_ssize_t end):
    # the twin's _decode_string of a complete string token, without json.loads when
    # it is plain printable ASCII (no escapes: what json.loads would return as is)
    cdef Py_ssize_t i
    for i in range(start + 1, end - 1):
        if buf[i] < 0x20 or buf[i] > 0x7E or buf[i] == 0x5C:
            return _decode_string(<bytes>buf[start:end])
    return (<bytes>buf[start + 1:end - 1]).decode("ascii")


cdef object integer_of(bytes raw):
    # json.loads of a scalar token, without it for plain digits (no sign, no
    # leading zero: where json.loads gives int(raw))
    cdef Py_ssize_t i, n = len(raw)
    cdef const unsigned char* p = raw
    if 0 < n <= 18 and (p[0] != 0x30 or n == 1):
        for i in range(n):
            if not 0x30 <= p[i] <= 0x39:
                return json.loads(raw)
        return int(raw)
    return json.loads(raw)


cdef class BodyScanner:
    """Feed chunks; read ``model``, ``max_tokens``, the prompt value's byte span
    (see the twin, geoserve._twin.bodyscan.BodyScanner)."""

    cdef public bytearray buffer
    cdef public int state
    cdef public Py_ssize_t pos
    cdef public Py_ssize_t scan
    cdef public object key
    cdef public Py_ssize_t value_start
    cdef public Py_ssize_t depth
    cdef public object model
    cdef public object model_span
    cdef public object max_tokens
    cdef public list limit_spans
    cdef public object object_start
    cdef public object prompt_span
    cdef public bint ended

    def __init__(self):
        self.buffer = bytearray()
        self.state = OPEN
        self.pos = 0
        self.scan = 0
        self.key = None
        self.value_start = 0
        self.depth = 0
        self.model = None
        self.model_span = None
        self.max_tokens = None
        self.limit_spans = []
        self.object_start = None
        self.prompt_span = None
        self.ended = False

    def feed(self, chunk, bint end=False):
        """Add a chunk (``end``: it is the last); raises :class:`BodyError`."""
        if self.ended:
            raise BodyError("data after the end of the body")
        self.buffer += chunk
        self._advance()
        if end:
            self.ended = True
            rest = skip_ws(<const unsigned char*>PyByteArray_AS_STRING(self.buffer), self.pos,
                           PyByteArray_GET_SIZE(self.buffer))
            if self.state != DONE:
                raise BodyError("the body is not a complete JSON object")
            if rest != PyByteArray_GET_SIZE(self.buffer):
                raise BodyError("data after the JSON object")

    @property
    def complete(self):
        return self.state == DONE

    def prompt_length(self):
        """Bytes of the prompt value received so far."""
        if self.prompt_span is None:
            return 0
        start, end = self.prompt_span
        return (end if end is not None else len(self.buffer)) - start

    def prompt_bytes(self):
        """The prompt value's bytes received so far (empty when none)."""
        if self.prompt_span is None:
            return b""
        start, end = self.prompt_span
        return bytes(self.buffer[start: end if end is not None else len(self.buffer)])

    cdef int _advance(self) except -1:
        cdef const unsigned char* buf = <const unsigned char*>PyByteArray_AS_STRING(self.buffer)
        cdef Py_ssize_t n = PyByteArray_GET_SIZE(self.buffer)
        cdef Py_ssize_t pos, i, stop, resume = 0
        cdef unsigned char c
        while True:
            pos = skip_ws(buf, self.pos, n)
            if pos >= n:
                self.pos = pos
                return 0
            c = buf[pos]
            if self.state == OPEN:
                if c != 0x7B:  # {
                    raise BodyError("the body must be a JSON object")
                self.object_start = pos
                self.pos, self.state = pos + 1, KEY
            elif self.state == KEY:
                if c == 0x7D and self.key is None:  # } right after { (an empty object)
                    self.pos, self.state = pos + 1, DONE
                    continue
                if c != 0x22:  # "
                    raise BodyError("expected a key in the JSON object")
                stop = self._string_end(buf, pos, n)
                if stop < 0:
                    self.pos = pos
                    return 0  # the key is still arriving
                self.key = string_of(buf, pos, stop)
                self.pos, self.state = stop, COLON
            elif self.state == COLON:
                if c != 0x3A:  # :
                    raise BodyError("expected ':' after a key")
                self.pos, self.state = pos + 1, VALUE
            elif self.state == VALUE:
                self.value_start = pos
                if self.prompt_span is None and self.key in PROMPTS:
                    self.prompt_span = (pos, None)
                if c == 0x7B or c == 0x5B:  # { [
                    self.depth, self.pos, self.state = 1, pos + 1, NEST
                elif c == 0x22:
                    stop = self._string_end(buf, pos, n)
                    if stop < 0:
                        self.pos = pos
                        return 0
                    self._value(buf, pos, stop)
                else:
                    stop = pos
                    while stop < n and scalar_byte(buf[stop]):
                        stop += 1
                    if stop == pos:
                        raise BodyError("expected a JSON value")
                    if stop == n:
                        self.pos = pos
                        return 0  # the number may go on in the next chunk
                    self._value(buf, pos, stop)
            elif self.state == NEST:
                i = pos
                if self.scan:  # a string inside the value ran on at the last chunk's end
                    i = self._string_end(buf, pos, n)
                    if i < 0:
                        self.pos = pos
                        return 0
                while True:
                    if i >= n:
                        self.pos = n
                        return 0
                    c = buf[i]
                    if c == 0x22:
                        stop = string_rest(buf, i + 1, n, &resume)
                        if stop < 0:
                            self.pos, self.scan = i, resume
                            return 0
                        i = stop
                    elif c == 0x7B or c == 0x5B:
                        self.depth += 1
                        i += 1
                    elif c == 0x7D or c == 0x5D:
                        self.depth -= 1
                        i += 1
                        if self.depth == 0:
                            self._value(buf, self.value_start, i)
                            break
                    else:
                        i += 1
            elif self.state == NEXT:
                if c == 0x2C:  # ,
                    self.pos, self.state = pos + 1, KEY
                elif c == 0x7D:  # }
                    self.pos, self.state = pos + 1, DONE
                else:
                    raise BodyError("expected ',' or '}' after a value")
            else:  # DONE
                self.pos = pos
                return 0

    cdef Py_ssize_t _string_end(self, const unsigned char* buf, Py_ssize_t pos, Py_ssize_t n):
        # the twin's _string_end: -1 while the string at pos runs on (scan: where to resume)
        cdef Py_ssize_t resume = 0
        cdef Py_ssize_t end = string_rest(buf, self.scan if self.scan else pos + 1, n, &resume)
        self.scan = resume if end < 0 else 0
        return end

    cdef int _value(self, const unsigned char* buf, Py_ssize_t start, Py_ssize_t end) except -1:
        key = self.key
        if key in WANTED:
            raw = <bytes>buf[start:end]
            if key == "model":
                if buf[start] != 0x22:
                    raise BodyError("model must be a string")
                self.model = string_of(buf, start, end)
                self.model_span = (start, end)
            elif key in PROMPTS:
                if self.prompt_span is not None and self.prompt_span[0] == start:
                    self.prompt_span = (start, end)
            elif raw != b"null":
                try:
                    value = integer_of(raw)
                except ValueError:
                    raise BodyError(f"{key} must be an integer") from None
                if type(value) is not int or value < 1:
                    raise BodyError(f"{key} must be an integer >= 1")
                self.max_tokens = value
                self.limit_spans.append((start, end))
        self.pos, self.state = end, NEXT
        return 0
