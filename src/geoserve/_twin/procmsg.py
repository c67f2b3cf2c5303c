"""What the Envoy endpoint picker reads from one ext_proc ``ProcessingRequest``
(the pure-Python twin of ``_core/procmsg.pyx``; the picker uses
``geoserve.integrations.envoy``'s ``read_message``, the compiled one where built).

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

This twin parses with the protobuf library and reads the same fields, so it is
the definition. The compiled reader walks the wire format and reads only these
fields; on every message the protobuf library serializes (unknown fields included)
the two agree, and on bytes that are not a ``ProcessingRequest`` both raise
:class:`WireError`. (Encodings no serializer writes - a string that is not UTF-8
in a field the picker does not read, say - the compiled reader may accept where
the library refuses.)
"""

from __future__ import annotations

from typing import Optional

__all__ = ["Message", "WireError", "read", "REQUEST_HEADERS", "RESPONSE_HEADERS", "REQUEST_BODY", "RESPONSE_BODY",
           "REQUEST_TRAILERS", "RESPONSE_TRAILERS", "FILTER_ATTRIBUTES", "UPSTREAM_ADDRESS"]

REQUEST_HEADERS, RESPONSE_HEADERS, REQUEST_BODY, RESPONSE_BODY, REQUEST_TRAILERS, RESPONSE_TRAILERS = range(2, 8)
_KINDS = {"request_headers": REQUEST_HEADERS, "response_headers": RESPONSE_HEADERS, "request_body": REQUEST_BODY,
          "response_body": RESPONSE_BODY, "request_trailers": REQUEST_TRAILERS, "response_trailers": RESPONSE_TRAILERS}
FILTER_ATTRIBUTES = "envoy.filters.http.ext_proc"
UPSTREAM_ADDRESS = "upstream.address"


class WireError(ValueError):
    """The bytes are not a ``ProcessingRequest``."""


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


_pb = None


def read(data: bytes, header_keys: frozenset) -> Message:
    global _pb
    if _pb is None:
        from envoy.service.ext_proc.v3 import external_processor_pb2

        _pb = external_processor_pb2
    from google.protobuf.message import DecodeError

    try:
        message = _pb.ProcessingRequest.FromString(data)
    except DecodeError as err:
        raise WireError(f"not an ext_proc ProcessingRequest: {err}") from None
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
