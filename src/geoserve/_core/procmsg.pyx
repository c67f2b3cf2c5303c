# The compiled twin of geoserve._twin.procmsg: the fields the Envoy picker reads of
# one serialized ext_proc ProcessingRequest (read) and of one message of Envoy's
# access log stream (read_access_log), taken straight from the wire format without
# building the message (the protobuf library builds every header, every timestamp
# as an object; the picker reads a handful). Protobuf's rules where a serializer
# can write them: a singular field seen twice - the last wins, a message merged; a
# oneof member replaced by another clears it; map entries - the last of a key
# wins; unknown fields skipped. tests/test_procmsg.py holds it to the twin.
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeLatin1, PyUnicode_DecodeUTF8
from libc.stdint cimport int32_t, uint64_t
from libc.string cimport memcmp

from geoserve._twin.procmsg import (FILTER_ATTRIBUTES, LB_NAMESPACE, REQUEST_BODY, REQUEST_HEADERS, RESPONSE_BODY,
                                    RESPONSE_HEADERS, UPSTREAM_ADDRESS, WireError)

cdef bytes ATTRIBUTES_KEY = FILTER_ATTRIBUTES.encode()
cdef bytes UPSTREAM_KEY = UPSTREAM_ADDRESS.encode()
cdef bytes LB_KEY = LB_NAMESPACE.encode()


cdef class Message:
    """The fields of one ``ProcessingRequest`` the picker reads (``_twin/procmsg.py``)."""

    cdef public int kind
    cdef public dict headers
    cdef public bint end_of_stream
    cdef public bytes body
    cdef public object upstream
    cdef public object modes


cdef struct Span:
    const unsigned char* at
    Py_ssize_t size


cdef struct Cursor:
    const unsigned char* buf
    Py_ssize_t pos
    Py_ssize_t end


cdef inline int varint(Cursor* c, uint64_t* out) except -1:
    cdef uint64_t value = 0
    cdef int shift = 0
    cdef unsigned char b
    while c.pos < c.end:
        b = c.buf[c.pos]
        c.pos += 1
        if shift < 64:
            value |= (<uint64_t>(b & 0x7F)) << shift
        if not b & 0x80:
            out[0] = value
            return 0
        shift += 7
        if shift >= 70:
            break
    raise WireError("malformed protobuf: a malformed varint")


cdef inline int tag(Cursor* c, int* field, int* wire) except -1:
    # the next field's number and wire type; 0 (field) at the end
    cdef uint64_t key
    if c.pos >= c.end:
        field[0] = 0
        return 0
    varint(c, &key)
    if key >> 3 == 0 or key >> 3 > 536870911:
        raise WireError("malformed protobuf: a field numbered 0")
    field[0] = <int>(key >> 3)
    wire[0] = <int>(key & 7)
    return 0


cdef inline int chunk(Cursor* c, Span* out) except -1:
    # a length-delimited field's bytes
    cdef uint64_t size
    varint(c, &size)
    if size > <uint64_t>(c.end - c.pos):
        raise WireError("malformed protobuf: a field runs past the end")
    out.at = c.buf + c.pos
    out.size = <Py_ssize_t>size
    c.pos += <Py_ssize_t>size
    return 0


cdef int skip_group(Cursor* c, int group, int depth) except -1:
    # an (unknown) group's fields up to its end tag
    cdef int field, wire
    if depth > 100:
        raise WireError("malformed protobuf: groups nested too deep")
    while True:
        tag(c, &field, &wire)
        if field == 0:
            raise WireError("malformed protobuf: a group without its end")
        if wire == 4:
            if field != group:
                raise WireError("malformed protobuf: a group's end does not match")
            return 0
        if wire == 3:
            skip_group(c, field, depth + 1)
        else:
            skip(c, wire)


cdef inline int skip(Cursor* c, int wire, int field=0) except -1:
    cdef uint64_t ignored
    cdef Span span
    if wire == 3:
        skip_group(c, field, 1)
    elif wire == 0:
        varint(c, &ignored)
    elif wire == 2:
        chunk(c, &span)
    elif wire == 1 or wire == 5:
        if c.end - c.pos < (8 if wire == 1 else 4):
            raise WireError("malformed protobuf: a field runs past the end")
        c.pos += 8 if wire == 1 else 4
    else:
        raise WireError(f"malformed protobuf: wire type {wire}")
    return 0


cdef inline Cursor within(Span span) noexcept:
    cdef Cursor c
    c.buf = span.at
    c.pos = 0
    c.end = span.size
    return c


cdef inline bint same(Span span, bytes key) noexcept:
    return span.size == PyBytes_GET_SIZE(key) and memcmp(span.at, PyBytes_AS_STRING(key), span.size) == 0


cdef inline str utf8(Span span):
    try:
        return PyUnicode_DecodeUTF8(<const char*>span.at, span.size, NULL)
    except UnicodeDecodeError:
        raise WireError("malformed protobuf: a string that is not UTF-8") from None


cdef dict _wanted_cache = {}


cdef tuple wanted(frozenset header_keys):
    # the keys as (bytes, str) pairs, built once per set
    found = _wanted_cache.get(header_keys)
    if found is None:
        if len(_wanted_cache) > 64:
            _wanted_cache.clear()
        found = _wanted_cache[header_keys] = tuple((k.encode(), k) for k in header_keys)
    return <tuple>found


cdef int read_header(Span span, tuple keys, dict headers) except -1:
    # one HeaderValue: key 1, value 2, raw_value 3 (each the last one seen)
    cdef Cursor c = within(span)
    cdef int field, wire
    cdef Span key, value, raw
    cdef bint has_key = False, has_value = False, has_raw = False
    while True:
        tag(&c, &field, &wire)
        if field == 0:
            break
        if wire == 2 and field == 1:
            chunk(&c, &key)
            has_key = True
        elif wire == 2 and field == 2:
            chunk(&c, &value)
            has_value = True
        elif wire == 2 and field == 3:
            chunk(&c, &raw)
            has_raw = True
        else:
            skip(&c, wire, field)
    if not has_key:
        key.size = 0
        key.at = span.at
    for pair in keys:
        if same(key, <bytes>(<tuple>pair)[0]):
            if has_raw and raw.size:
                headers[(<tuple>pair)[1]] = PyUnicode_DecodeLatin1(<const char*>raw.at, raw.size, NULL)
            elif has_value:
                headers[(<tuple>pair)[1]] = utf8(value)
            else:
                headers[(<tuple>pair)[1]] = ""
            break
    return 0


cdef int read_headers(Span span, tuple keys, Message out) except -1:
    # HttpHeaders: headers 1 (HeaderMap: headers 1, repeated), end_of_stream 3
    cdef Cursor c = within(span)
    cdef Cursor inner
    cdef int field, wire, f2, w2
    cdef Span part, one
    cdef uint64_t flag
    while True:
        tag(&c, &field, &wire)
        if field == 0:
            return 0
        if field == 1 and wire == 2:
            chunk(&c, &part)
            inner = within(part)
            while True:
                tag(&inner, &f2, &w2)
                if f2 == 0:
                    break
                if f2 == 1 and w2 == 2:
                    chunk(&inner, &one)
                    read_header(one, keys, out.headers)
                else:
                    skip(&inner, w2, f2)
        elif field == 3 and wire == 0:
            varint(&c, &flag)
            out.end_of_stream = flag != 0
        else:
            skip(&c, wire, field)


cdef int read_body(Span span, Message out) except -1:
    # HttpBody: body 1, end_of_stream 2
    cdef Cursor c = within(span)
    cdef int field, wire
    cdef Span body
    cdef uint64_t flag
    while True:
        tag(&c, &field, &wire)
        if field == 0:
            return 0
        if field == 1 and wire == 2:
            chunk(&c, &body)
            out.body = PyBytes_FromStringAndSize(<const char*>body.at, body.size)
        elif field == 2 and wire == 0:
            varint(&c, &flag)
            out.end_of_stream = flag != 0
        else:
            skip(&c, wire, field)


cdef object string_value(Span span):
    # google.protobuf.Value: string_value 3; any other kind set after it clears it
    cdef Cursor c = within(span)
    cdef int field, wire
    cdef Span text
    cdef str value = ""
    while True:
        tag(&c, &field, &wire)
        if field == 0:
            return value
        if field == 3 and wire == 2:
            chunk(&c, &text)
            value = utf8(text)
        else:
            if (wire == 0 and (field == 1 or field == 4)) or (wire == 1 and field == 2) or (
                    wire == 2 and (field == 5 or field == 6)):
                value = ""
            skip(&c, wire, field)


cdef int entry(Span span, Span* key, Span* value, bint* has_value) except -1:
    # a map entry: key 1, value 2 (each the last one seen)
    cdef Cursor c = within(span)
    cdef int field, wire
    key.at = span.at
    key.size = 0
    has_value[0] = False
    while True:
        tag(&c, &field, &wire)
        if field == 0:
            return 0
        if field == 1 and wire == 2:
            chunk(&c, key)
        elif field == 2 and wire == 2:
            chunk(&c, value)
            has_value[0] = True
        else:
            skip(&c, wire, field)


cdef object upstream_of(Span span, bint present):
    # the filter's attributes (a Struct: fields 1, a map to Value): "upstream.address"
    cdef Cursor c
    cdef int field, wire
    cdef Span one, key, value
    cdef bint has_value
    found = None
    if not present:
        return None
    c = within(span)
    while True:
        tag(&c, &field, &wire)
        if field == 0:
            return found
        if field == 1 and wire == 2:
            chunk(&c, &one)
            entry(one, &key, &value, &has_value)
            if same(key, UPSTREAM_KEY):
                found = string_value(value) if has_value else ""
        else:
            skip(&c, wire, field)


cdef tuple read_modes(Span span, object before):
    # ProtocolConfiguration: request_body_mode 1, response_body_mode 2,
    # send_body_without_waiting_for_header_response 3 (merged into an earlier one)
    cdef Cursor c = within(span)
    cdef int field, wire
    cdef uint64_t v
    cdef int32_t request_mode = 0, response_mode = 0
    cdef bint send_without_waiting = False
    if before is not None:
        request_mode, response_mode, send_without_waiting = before
    while True:
        tag(&c, &field, &wire)
        if field == 0:
            return (request_mode, response_mode, send_without_waiting)
        if wire == 0 and 1 <= field <= 3:
            varint(&c, &v)
            if field == 1:
                request_mode = <int32_t>v
            elif field == 2:
                response_mode = <int32_t>v
            else:
                send_without_waiting = v != 0
        else:
            skip(&c, wire, field)


def read(bytes data, frozenset header_keys):
    """``_twin/procmsg.read``: the picker's fields of one serialized ``ProcessingRequest``."""
    cdef tuple keys = wanted(header_keys)
    cdef Message out = Message.__new__(Message)
    cdef Cursor c
    cdef int field, wire
    cdef Span part, key, value
    cdef bint has_value
    out.kind = 0
    out.headers = {}
    out.end_of_stream = False
    out.body = b""
    out.upstream = None
    out.modes = None
    c.buf = <const unsigned char*>PyBytes_AS_STRING(data)
    c.pos = 0
    c.end = PyBytes_GET_SIZE(data)
    while True:
        tag(&c, &field, &wire)
        if field == 0:
            return out
        if 2 <= field <= 7 and wire == 2:
            chunk(&c, &part)
            if field != out.kind:  # another member of the oneof: the one before is cleared
                out.kind = field
                out.headers = {}
                out.end_of_stream = False
                out.body = b""
            if field == REQUEST_HEADERS or field == RESPONSE_HEADERS:
                read_headers(part, keys, out)
            elif field == REQUEST_BODY or field == RESPONSE_BODY:
                read_body(part, out)
            else:
                skip_message(part)
        elif field == 9 and wire == 2:
            chunk(&c, &part)
            entry(part, &key, &value, &has_value)
            if same(key, ATTRIBUTES_KEY):
                out.upstream = upstream_of(value, has_value)
        elif field == 11 and wire == 2:
            chunk(&c, &part)
            out.modes = read_modes(part, out.modes)
        else:
            skip(&c, wire, field)


cdef int skip_message(Span span) except -1:
    # a message the picker does not read (trailers): its fields are skipped, but
    # they must be well formed
    cdef Cursor c = within(span)
    cdef int field, wire
    while True:
        tag(&c, &field, &wire)
        if field == 0:
            return 0
        skip(&c, wire, field)


# ---------------------------------------------------------------- the access log
cdef struct LogEntry:
    Span request_id
    bint has_request_id
    uint64_t status
    Span host
    bint has_host
    uint64_t port
    bint routed


cdef int read_socket(Span span, LogEntry* e) except -1:
    # SocketAddress, merged into what came before: address 2; port_value 3 or named_port 4 (a oneof)
    cdef Cursor c = within(span)
    cdef int field, wire
    cdef Span ignored
    while True:
        tag(&c, &field, &wire)
        if field == 0:
            return 0
        if field == 2 and wire == 2:
            chunk(&c, &e.host)
            e.has_host = True
        elif field == 3 and wire == 0:
            varint(&c, &e.port)
            e.port &= 0xFFFFFFFF  # uint32
        elif field == 4 and wire == 2:
            chunk(&c, &ignored)
            e.port = 0
        else:
            skip(&c, wire, field)


cdef int read_address(Span span, LogEntry* e) except -1:
    # Address: socket_address 1, or pipe 2 / envoy_internal_address 3 (a oneof: they clear it)
    cdef Cursor c = within(span)
    cdef int field, wire
    cdef Span part
    while True:
        tag(&c, &field, &wire)
        if field == 0:
            return 0
        if 1 <= field <= 3 and wire == 2:
            chunk(&c, &part)
            if field == 1:
                read_socket(part, e)
            else:
                e.has_host = False
                e.port = 0
                skip_message(part)
        else:
            skip(&c, wire, field)


cdef int read_common(Span span, LogEntry* e) except -1:
    # AccessLogCommon: upstream_remote_address 13; metadata 17 (Metadata: filter_metadata 1,
    # a map to Struct - the picker's routed requests carry its envoy.lb key)
    cdef Cursor c = within(span)
    cdef Cursor inner
    cdef int field, wire, f2, w2
    cdef Span part, one, key, value
    cdef bint has_value
    while True:
        tag(&c, &field, &wire)
        if field == 0:
            return 0
        if field == 13 and wire == 2:
            chunk(&c, &part)
            read_address(part, e)
        elif field == 17 and wire == 2:
            chunk(&c, &part)
            inner = within(part)
            while True:
                tag(&inner, &f2, &w2)
                if f2 == 0:
                    break
                if f2 == 1 and w2 == 2:
                    chunk(&inner, &one)
                    entry(one, &key, &value, &has_value)
                    if same(key, LB_KEY):
                        e.routed = True
                else:
                    skip(&inner, w2, f2)
        else:
            skip(&c, wire, field)


cdef int read_status(Span span, LogEntry* e) except -1:
    # HTTPResponseProperties: response_code 1 (UInt32Value: value 1, merged)
    cdef Cursor c = within(span)
    cdef Cursor inner
    cdef int field, wire, f2, w2
    cdef Span part
    while True:
        tag(&c, &field, &wire)
        if field == 0:
            return 0
        if field == 1 and wire == 2:
            chunk(&c, &part)
            inner = within(part)
            while True:
                tag(&inner, &f2, &w2)
                if f2 == 0:
                    break
                if f2 == 1 and w2 == 0:
                    varint(&inner, &e.status)
                    e.status &= 0xFFFFFFFF  # uint32
                else:
                    skip(&inner, w2, f2)
        else:
            skip(&c, wire, field)


cdef int read_request_id(Span span, LogEntry* e) except -1:
    # HTTPRequestProperties: request_id 9
    cdef Cursor c = within(span)
    cdef int field, wire
    while True:
        tag(&c, &field, &wire)
        if field == 0:
            return 0
        if field == 9 and wire == 2:
            chunk(&c, &e.request_id)
            e.has_request_id = True
        else:
            skip(&c, wire, field)


cdef tuple read_log_entry(Span span):
    # HTTPAccessLogEntry: common_properties 1, request 3, response 4
    cdef Cursor c = within(span)
    cdef int field, wire
    cdef Span part
    cdef LogEntry e
    e.has_request_id = False
    e.status = 0
    e.has_host = False
    e.port = 0
    e.routed = False
    while True:
        tag(&c, &field, &wire)
        if field == 0:
            break
        if (field == 1 or field == 3 or field == 4) and wire == 2:
            chunk(&c, &part)
            if field == 1:
                read_common(part, &e)
            elif field == 3:
                read_request_id(part, &e)
            else:
                read_status(part, &e)
        else:
            skip(&c, wire, field)
    host = utf8(e.host) if e.has_host else ""
    upstream = None
    if host:
        upstream = f"[{host}]:{e.port}" if ":" in host else f"{host}:{e.port}"
    return (utf8(e.request_id) if e.has_request_id else "", <object>e.status, upstream, <bint>e.routed)


def read_access_log(bytes data):
    """``_twin/procmsg.read_access_log``: the picker's fields of the HTTP entries of
    one serialized ``StreamAccessLogsMessage``."""
    cdef Cursor c
    cdef Cursor inner
    cdef int field, wire, f2, w2
    cdef Span part, one
    cdef list entries = []
    c.buf = <const unsigned char*>PyBytes_AS_STRING(data)
    c.pos = 0
    c.end = PyBytes_GET_SIZE(data)
    while True:
        tag(&c, &field, &wire)
        if field == 0:
            return entries
        if field == 2 and wire == 2:  # http_logs: log_entry 1, repeated
            chunk(&c, &part)
            inner = within(part)
            while True:
                tag(&inner, &f2, &w2)
                if f2 == 0:
                    break
                if f2 == 1 and w2 == 2:
                    chunk(&inner, &one)
                    entries.append(read_log_entry(one))
                else:
                    skip(&inner, w2, f2)
        elif field == 3 and wire == 2:  # tcp_logs: the oneof's other member clears the HTTP entries
            chunk(&c, &part)
            skip_message(part)
            entries = []
        else:
            skip(&c, wire, field)
