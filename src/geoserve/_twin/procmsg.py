"""What the Envoy endpoint picker reads from one ext_proc ``ProcessingRequest``, and
from one message of Envoy's gRPC access log stream (the pure-Python twin of
``_core/procmsg.pyx``; the picker uses ``geoserve.integrations.envoy``'s
``read_message`` and ``read_access_log``, the compiled ones where built).

The picker reads a handful of fields of each message and nothing else, so it need
not build the message: ``read(data, header_keys)`` takes the serialized bytes and
returns a :class:`Message` with

* ``kind`` - which part of the HTTP exchange the message carries, as the number of
  its ``request`` oneof field (``REQUEST_HEADERS`` 2, ``RESPONSE_HEADERS`` 3,
  ``REQUEST_BODY`` 4, ``RESPONSE_BODY`` 5, ``REQUEST_TRAILERS`` 6,
  ``RESPONSE_TRAILERS`` 7; 0 when none is set);
* ``headers`` - of request or response headers, those whose key is in
  ``header_keys``, as ``str`` (``raw_value`` read as Latin-1, else ``value``; the
  last of a repeated key wins);
* ``end_of_stream`` - of headers or body; ``body`` - a body chunk's bytes;
* ``upstream`` - the ``upstream.address`` attribute Envoy sends with the
  response (``attributes["envoy.filters.http.ext_proc"]``; ``""`` when it is not a
  string, ``None`` when absent);
* ``modes`` - ``(request_body_mode, response_body_mode,
  send_body_without_waiting_for_header_response)`` of ``protocol_config``, or
  ``None`` when the message has none.

``read_access_log(data)`` takes a serialized ``StreamAccessLogsMessage`` and
returns its HTTP entries in order as ``(request_id, status, upstream, routed)``:
``request.request_id``, ``response.response_code`` (0 when absent), the
``upstream_remote_address`` socket address as ``host:port`` (``[host]:port`` for
IPv6; ``None`` without a host), and whether ``metadata.filter_metadata`` has the
picker's ``envoy.lb`` key (a request it routed).

This twin parses with the protobuf library and reads the same fields, so it is
the definition. The compiled reader walks the wire format and reads only these
fields; on every message the protobuf library serializes (unknown fields included)
the two agree, and on bytes that are not a ``ProcessingRequest`` both raise
:class:`WireError`. (Encodings no serializer writes - a string that is not UTF-8
in a field the picker does not read, say - the compiled reader may accept where
the library refuses.)
"""

from __future__ import annotations

import importlib
from typing import Optional

__all__ = ["Message", "WireError", "read", "read_access_log", "REQUEST_HEADERS", "RESPONSE_HEADERS", "REQUEST_BODY",
           "RESPONSE_BODY", "REQUEST_TRAILERS", "RESPONSE_TRAILERS", "FILTER_ATTRIBUTES", "UPSTREAM_ADDRESS",
           "LB_NAMESPACE"]

REQUEST_HEADERS, RESPONSE_HEADERS, REQUEST_BODY, RESPONSE_BODY, REQUEST_TRAILERS, RESPONSE_TRAILERS = range(2, 8)
_KINDS = {"request_headers": REQUEST_HEADERS, "response_headers": RESPONSE_HEADERS, "request_body": REQUEST_BODY,
          "response_body": RESPONSE_BODY, "request_trailers": REQUEST_TRAILERS, "response_trailers": RESPONSE_TRAILERS}
FILTER_ATTRIBUTES = "envoy.filters.http.ext_proc"
UPSTREAM_ADDRESS = "upstream.address"
LB_NAMESPACE = "envoy.lb"  # the picker's dynamic metadata (the destination and its fallbacks)


class WireError(ValueError):
    """The bytes are not the message they should be."""


class Message:
    """The fields of one ``ProcessingRequest`` the picker reads (see the module)."""

    __slots__ = ("kind", "headers", "end_of_stream", "body", "upstream", "modes")

    def __init__(self, kind: int = 0, headers: Optional[dict] = None, end_of_stream: bool = False,
                 body: bytes = b"", upstream: Optional[str] = None, modes: Optional[tuple] = None) -> None:
        self.kind = kind
        self.headers = {} if headers is None else headers
        self.end_of_stream = end_of_stream
        self.body = body
        self.upstream = upstream
        self.modes = modes


def _parse(data: bytes, module: str, name: str, what: str):
    """``data`` parsed as the protobuf message ``module.name`` (imported at first use)."""
    from google.protobuf.message import DecodeError

    try:
        return getattr(importlib.import_module(module), name).FromString(data)
    except DecodeError as err:
        raise WireError(f"not {what}: {err}") from None


def read(data: bytes, header_keys: frozenset) -> Message:
    message = _parse(data, "envoy.service.ext_proc.v3.external_processor_pb2", "ProcessingRequest",
                     "an ext_proc ProcessingRequest")
    out = Message()
    name = message.WhichOneof("request")
    if name is not None:
        out.kind = _KINDS[name]
        part = getattr(message, name)
        if out.kind in (REQUEST_HEADERS, RESPONSE_HEADERS):
            out.headers = {h.key: (h.raw_value.decode("latin-1") if h.raw_value else h.value)
                           for h in part.headers.headers if h.key in header_keys}
            out.end_of_stream = part.end_of_stream
        elif out.kind in (REQUEST_BODY, RESPONSE_BODY):
            out.body, out.end_of_stream = part.body, part.end_of_stream
    attributes = message.attributes.get(FILTER_ATTRIBUTES)
    if attributes is not None and UPSTREAM_ADDRESS in attributes.fields:
        out.upstream = attributes.fields[UPSTREAM_ADDRESS].string_value
    if message.HasField("protocol_config"):
        config = message.protocol_config
        out.modes = (config.request_body_mode, config.response_body_mode,
                     config.send_body_without_waiting_for_header_response)
    return out


def read_access_log(data: bytes) -> list:
    message = _parse(data, "envoy.service.accesslog.v3.als_pb2", "StreamAccessLogsMessage", "an access log message")
    entries = []
    for entry in message.http_logs.log_entry:
        common = entry.common_properties
        socket = common.upstream_remote_address.socket_address
        host = socket.address
        upstream = ((f"[{host}]" if ":" in host else host) + f":{socket.port_value}") if host else None
        entries.append((entry.request.request_id, entry.response.response_code.value, upstream,
                        LB_NAMESPACE in common.metadata.filter_metadata))
    return entries
