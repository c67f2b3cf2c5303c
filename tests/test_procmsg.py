"""The ext_proc message reader: the compiled kernel (``_core/procmsg.pyx``) against
its twin (``_twin/procmsg.py``, the protobuf library), field by field, on messages
the protobuf library serializes - every kind, headers with repeated and unread
keys, attributes, protocol configurations, unknown fields, several messages
concatenated (protobuf's merge) - and on bytes that are not a message."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("envoy.service.ext_proc.v3.external_processor_pb2")

from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402

from geoserve import _compat  # noqa: E402
from geoserve._twin import procmsg as twin  # noqa: E402

compiled = _compat.compiled_procmsg
pytestmark = pytest.mark.skipif(compiled is None, reason="the compiled kernels are not built")

KEYS = frozenset(("content-length", "x-session-id", "x-geoserve-priority", ":status"))
FIELDS = ("kind", "headers", "end_of_stream", "body", "upstream", "modes")


def fields(message) -> tuple:
    return tuple(getattr(message, name) for name in FIELDS)


def outcome(reader, data: bytes):
    try:
        return fields(reader.read(data, KEYS))
    except twin.WireError:
        return "WireError"


names = st.sampled_from(sorted(KEYS) + ["x-request-id", ":path", "", "Content-Length", "x-ünïcode"])
text = st.text(max_size=12)
header = st.builds(lambda key, value, raw, use_raw: base_pb2.HeaderValue(
    key=key, **({"raw_value": raw} if use_raw else {"value": value})), names, text, st.binary(max_size=12), st.booleans())
headers = st.builds(lambda hs, end: pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=hs), end_of_stream=end),
                    st.lists(header, max_size=6), st.booleans())
body = st.builds(lambda data, end: pb.HttpBody(body=data, end_of_stream=end), st.binary(max_size=40), st.booleans())


def value():
    return st.one_of(st.builds(lambda s: struct_pb2.Value(string_value=s), text),
                     st.builds(lambda x: struct_pb2.Value(number_value=x), st.floats(allow_nan=False)),
                     st.builds(lambda b: struct_pb2.Value(bool_value=b), st.booleans()),
                     st.just(struct_pb2.Value()))


attributes = st.dictionaries(st.sampled_from([twin.FILTER_ATTRIBUTES, "other.filter"]),
                             st.builds(lambda d: struct_pb2.Struct(fields=d),
                                       st.dictionaries(st.sampled_from([twin.UPSTREAM_ADDRESS, "request.path"]),
                                                       value(), max_size=2)), max_size=2)
config = st.one_of(st.none(), st.builds(pb.ProtocolConfiguration, request_body_mode=st.integers(0, 5),
                                        response_body_mode=st.integers(0, 5),
                                        send_body_without_waiting_for_header_response=st.booleans()))


@st.composite
def requests(draw):
    kind = draw(st.sampled_from(["request_headers", "response_headers", "request_body", "response_body",
                                 "request_trailers", "response_trailers", None]))
    parts = {}
    if kind in ("request_headers", "response_headers"):
        parts[kind] = draw(headers)
    elif kind in ("request_body", "response_body"):
        parts[kind] = draw(body)
    elif kind is not None:
        parts[kind] = pb.HttpTrailers(trailers=base_pb2.HeaderMap(headers=draw(st.lists(header, max_size=2))))
    message = pb.ProcessingRequest(**parts, attributes=draw(attributes), observability_mode=draw(st.booleans()))
    pc = draw(config)
    if pc is not None:
        message.protocol_config.CopyFrom(pc)
    if draw(st.booleans()):
        message.metadata_context.filter_metadata["x"].update({"k": "v"})
    return message.SerializeToString()


@given(data=requests())
def test_reads_what_protobuf_reads(data):
    assert outcome(compiled, data) == outcome(twin, data)
    assert outcome(compiled, data) != "WireError"


@given(messages=st.lists(requests(), min_size=2, max_size=3), unknown=st.binary(max_size=4))
def test_merged_messages_and_unknown_fields(messages, unknown):
    """Messages concatenated are one message to protobuf (a oneof member replaced,
    headers merged, the last scalar wins); an unknown field is skipped."""
    extra = b"\xa2\x06" + bytes([len(unknown)]) + unknown  # field 100, length-delimited
    data = b"".join(messages) + extra
    assert outcome(compiled, data) == outcome(twin, data)


@given(data=requests().filter(bool))
def test_truncated(data):
    """A message cut short is refused by both."""
    assert outcome(compiled, data[:-1]) == outcome(twin, data[:-1]) == "WireError"


GROUPS = st.sampled_from([b"\x0b\x0c", b"\x0b\x13\x14\x0c", b"\x0b\x08\x01\x0c", b"\x0b", b"\x0b\x14", b"\x0c"])


@given(data=st.one_of(st.binary(max_size=40), requests().flatmap(lambda d: st.binary(max_size=3).map(lambda j: j + d)),
                      st.tuples(requests(), GROUPS, requests()).map(b"".join)))
def test_garbage(data):
    """Bytes that are not a message: a WireError or a reading, never a crash (the
    library also checks strings and nested messages the picker does not read, so
    the kernel may read where the library refuses)."""
    got = outcome(compiled, data)
    assert got == "WireError" or isinstance(got, tuple)
    if got == "WireError":
        assert outcome(twin, data) == "WireError"


def test_the_picker_fields():
    attrs = struct_pb2.Struct()
    attrs.update({twin.UPSTREAM_ADDRESS: "10.0.0.1:8000"})
    data = pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
            base_pb2.HeaderValue(key=":status", raw_value=b"503"), base_pb2.HeaderValue(key="x-other", raw_value=b"1"),
            base_pb2.HeaderValue(key=":status", value="200")]), end_of_stream=True),
        attributes={twin.FILTER_ATTRIBUTES: attrs},
        protocol_config=pb.ProtocolConfiguration(request_body_mode=1, send_body_without_waiting_for_header_response=True),
    ).SerializeToString()
    for reader in (compiled, twin):
        m = reader.read(data, KEYS)
        assert (m.kind, m.headers, m.end_of_stream, m.upstream, m.modes) == (
            twin.RESPONSE_HEADERS, {":status": "200"}, True, "10.0.0.1:8000", (1, 0, True))
    group = b"\x0b\x13\x14\x08\x01\x0c"  # an unknown group (field 1) with a group inside: skipped
    assert fields(compiled.read(group + data, KEYS)) == fields(twin.read(group + data, KEYS))
    for bad in (b"\x12\xff", b"\x12\x05ab", b"\x0f", b"\xff" * 11, b"\x0b\x14", b"\x0b"):
        for reader in (compiled, twin):
            with pytest.raises(twin.WireError):
                reader.read(bad, KEYS)


# ---------------------------------------------------------------- the access log
def logged(reader, data: bytes):
    try:
        return reader.read_access_log(data)
    except twin.WireError:
        return "WireError"


@st.composite
def access_logs(draw):
    """A StreamAccessLogsMessage as Envoy writes one: HTTP entries with the fields the
    picker reads (or not), among others it does not; an identifier; or TCP entries."""
    from envoy.config.core.v3 import address_pb2
    from envoy.data.accesslog.v3 import accesslog_pb2 as al
    from envoy.service.accesslog.v3 import als_pb2

    entries = []
    for _ in range(draw(st.integers(0, 3))):
        common = al.AccessLogCommon(upstream_cluster=draw(text), downstream_wire_bytes_sent=draw(st.integers(0, 9)))
        address = draw(st.sampled_from(["socket", "socket", "pipe", None]))
        if address == "socket":
            socket = address_pb2.SocketAddress(address=draw(st.sampled_from(["127.0.0.1", "::1", "", "10.0.0.2"])))
            if draw(st.booleans()):
                socket.port_value = draw(st.integers(0, 65535))
            else:
                socket.named_port = "http"
            common.upstream_remote_address.socket_address.CopyFrom(socket)
        elif address == "pipe":
            common.upstream_remote_address.pipe.path = "/tmp/sock"
        for key in draw(st.lists(st.sampled_from([twin.LB_NAMESPACE, "other"]), max_size=2)):
            common.metadata.filter_metadata[key].update({"x-gateway-destination-endpoint": draw(text)})
        entry = al.HTTPAccessLogEntry(common_properties=common, request=al.HTTPRequestProperties(
            request_id=draw(text), path=draw(text)))
        if draw(st.booleans()):
            entry.response.response_code.value = draw(st.sampled_from([0, 200, 429, 503, 2 ** 32 - 1]))
        entry.response.response_code_details = draw(text)
        entries.append(entry)
    message = als_pb2.StreamAccessLogsMessage()
    if draw(st.booleans()):
        message.identifier.log_name = "geoserve"
    if draw(st.integers(0, 5)) == 0:
        message.tcp_logs.log_entry.add()
    else:
        message.http_logs.log_entry.extend(entries)
    return message.SerializeToString()


@given(data=access_logs())
def test_reads_the_access_log_as_protobuf_does(data):
    assert logged(compiled, data) == logged(twin, data) != "WireError"


@given(messages=st.lists(access_logs(), min_size=2, max_size=3), unknown=st.binary(max_size=4))
def test_merged_access_logs_and_unknown_fields(messages, unknown):
    """Concatenated: the HTTP entries add up (TCP entries clear them, the oneof's
    other member); an unknown field is skipped."""
    data = b"".join(messages) + b"\xa2\x06" + bytes([len(unknown)]) + unknown
    assert logged(compiled, data) == logged(twin, data)


@given(data=st.one_of(access_logs().filter(bool).map(lambda d: d[:-1]), st.binary(max_size=40),
                      access_logs().flatmap(lambda d: st.binary(max_size=3).map(lambda j: j + d))))
def test_access_log_garbage(data):
    """Cut short, or not a message: a WireError or a reading, never a crash; the
    kernel refuses only what the library refuses too."""
    got = logged(compiled, data)
    assert got == "WireError" or isinstance(got, list)
    if got == "WireError":
        assert logged(twin, data) == "WireError"


def test_the_access_log_fields():
    from envoy.config.core.v3 import address_pb2
    from envoy.data.accesslog.v3 import accesslog_pb2 as al
    from envoy.service.accesslog.v3 import als_pb2

    def entry(rid, address, port, status, routed):
        common = al.AccessLogCommon()
        if address is not None:
            common.upstream_remote_address.socket_address.CopyFrom(
                address_pb2.SocketAddress(address=address, port_value=port))
        if routed:
            common.metadata.filter_metadata[twin.LB_NAMESPACE].update({"x-gateway-destination-endpoint": "a"})
        e = al.HTTPAccessLogEntry(common_properties=common, request=al.HTTPRequestProperties(request_id=rid))
        if status is not None:
            e.response.response_code.value = status
        return e

    data = als_pb2.StreamAccessLogsMessage(http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=[
        entry("a", "10.0.0.1", 8000, 200, True), entry("b", "::1", 9, 503, False), entry("", None, 0, None, True),
    ])).SerializeToString()
    for reader in (compiled, twin):
        assert reader.read_access_log(data) == [("a", 200, "10.0.0.1:8000", True), ("b", 503, "[::1]:9", False),
                                                ("", 0, None, True)]
        for bad in (b"\x12\xff", b"\x12\x05ab", b"\x0f"):
            with pytest.raises(twin.WireError):
                reader.read_access_log(bad)
