"""The head of an OpenAI-style JSON body, read as it streams in (the pure-Python
twin of ``_core/bodyscan.pyx``; use it as ``geoserve.integrations.openai_body``).

A gateway that must route on the body should not wait for all of it: a 220 KB
prompt arrives in a dozen chunks, and what routing needs - the ``model``, the first
few kilobytes of ``messages`` or ``prompt``, ``max_tokens`` - is usually near the
front. :class:`BodyScanner` is fed chunks and tracks the top level of the JSON
object only (keys, and where each value starts and ends), skipping nested values
with a C-speed regular expression; it never builds the body.

It does not validate nested values: a body whose ``messages`` are malformed deep
inside is caught by the full parse the picker runs when the whole body is there
before it decides, or else by the engine (which answers 400 itself).
"""

from __future__ import annotations

import json
import re
from typing import Optional

__all__ = ["BodyScanner", "BodyError", "PROMPT_KEYS"]

PROMPT_KEYS = ("messages", "prompt")
_WANTED = ("model", "max_tokens", "max_completion_tokens") + PROMPT_KEYS

_WS = re.compile(rb"[ \t\r\n]*")
# The rest of a string from inside it; group 1 (the closing quote) is None when it
# runs to the end of the buffer (it goes on in the next chunk): nothing else can
# stop the repetition, and where it stops (the end, or a lone backslash there) is
# where the scan resumes when the next chunk comes - a long string is read once,
# not once per chunk.
_STRING_REST = re.compile(rb'(?:[^"\\]|\\.)*(")?', re.S)
# Inside a nested value only strings and brackets matter.
_NESTED = re.compile(rb'"(?:[^"\\]|\\.)*(")?|[\[\]{}]', re.S)
_SCALAR = re.compile(rb"[^,}\]\s]+")

_OPEN, _KEY, _COLON, _VALUE, _NEST, _NEXT, _DONE = range(7)


class BodyError(ValueError):
    """The body is not a JSON object, or a field routing reads has the wrong type."""


class BodyScanner:
    """Feed chunks; read ``model``, ``max_tokens``, the prompt value's byte span.

    ``prompt_span`` is ``(start, end)`` of the ``messages`` / ``prompt`` value in
    the bytes fed so far (``end`` None while it is still streaming in).
    """

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.state = _OPEN
        self.pos = 0
        self.scan = 0  # inside the string that starts at pos and runs on: where its scan resumes (0: none)
        self.key: Optional[str] = None
        self.value_start = 0
        self.depth = 0
        self.model: Optional[str] = None
        self.model_span: Optional[tuple[int, int]] = None
        self.max_tokens: Optional[int] = None
        self.limit_spans: list[tuple[int, int]] = []  # the max_tokens / max_completion_tokens values
        self.object_start: Optional[int] = None  # where the top-level '{' is
        self.prompt_span: Optional[tuple[int, Optional[int]]] = None
        self.ended = False

    # ------------------------------------------------------------ input
    def feed(self, chunk: bytes, end: bool = False) -> None:
        """Add a chunk (``end``: it is the last); raises :class:`BodyError`."""
        if self.ended:
            raise BodyError("data after the end of the body")
        self.buffer += chunk
        self._advance()
        if end:
            self.ended = True
            rest = _WS.match(self.buffer, self.pos).end()
            if self.state != _DONE:
                raise BodyError("the body is not a complete JSON object")
            if rest != len(self.buffer):
                raise BodyError("data after the JSON object")

    @property
    def complete(self) -> bool:
        return self.state == _DONE

    def prompt_length(self) -> int:
        """Bytes of the prompt value received so far."""
        if self.prompt_span is None:
            return 0
        start, end = self.prompt_span
        return (end if end is not None else len(self.buffer)) - start

    def prompt_bytes(self) -> bytes:
        """The prompt value's bytes received so far (empty when none)."""
        if self.prompt_span is None:
            return b""
        start, end = self.prompt_span
        return bytes(self.buffer[start: end if end is not None else len(self.buffer)])

    # ------------------------------------------------------------ the scan
    def _advance(self) -> None:
        buf = self.buffer
        n = len(buf)
        while True:
            pos = _WS.match(buf, self.pos).end()
            if pos >= n:
                self.pos = pos
                return
            c = buf[pos]
            state = self.state
            if state == _OPEN:
                if c != 0x7B:  # {
                    raise BodyError("the body must be a JSON object")
                self.object_start = pos
                self.pos, self.state = pos + 1, _KEY
            elif state == _KEY:
                if c == 0x7D and self.key is None:  # } right after { (an empty object)
                    self.pos, self.state = pos + 1, _DONE
                    continue
                if c != 0x22:  # "
                    raise BodyError("expected a key in the JSON object")
                end = self._string_end(buf, pos)
                if end is None:
                    self.pos = pos
                    return  # the key is still arriving
                self.key = _decode_string(bytes(buf[pos:end]))
                self.pos, self.state = end, _COLON
            elif state == _COLON:
                if c != 0x3A:  # :
                    raise BodyError("expected ':' after a key")
                self.pos, self.state = pos + 1, _VALUE
            elif state == _VALUE:
                self.value_start = pos
                if self.key in PROMPT_KEYS and self.prompt_span is None:
                    self.prompt_span = (pos, None)
                if c == 0x7B or c == 0x5B:  # { [
                    self.depth, self.pos, self.state = 1, pos + 1, _NEST
                elif c == 0x22:
                    end = self._string_end(buf, pos)
                    if end is None:
                        self.pos = pos
                        return
                    self._value(buf, pos, end)
                else:
                    m = _SCALAR.match(buf, pos)
                    if m is None:
                        raise BodyError("expected a JSON value")
                    if m.end() == n:
                        self.pos = pos
                        return  # the number may go on in the next chunk
                    self._value(buf, pos, m.end())
            elif state == _NEST:
                if self.scan:  # a string inside the value ran on at the last chunk's end
                    end = self._string_end(buf, pos)
                    if end is None:
                        self.pos = pos
                        return
                    pos = end
                for m in _NESTED.finditer(buf, pos):
                    token = m.group()
                    if token[0] == 0x22:
                        if m.group(1) is None:
                            self.pos, self.scan = m.start(), m.end()
                            return
                        continue
                    self.depth += 1 if token in (b"{", b"[") else -1
                    if self.depth == 0:
                        self._value(buf, self.value_start, m.end())
                        break
                else:
                    self.pos = n
                    return
            elif state == _NEXT:
                if c == 0x2C:  # ,
                    self.pos, self.state = pos + 1, _KEY
                elif c == 0x7D:  # }
                    self.pos, self.state = pos + 1, _DONE
                else:
                    raise BodyError("expected ',' or '}' after a value")
            else:  # _DONE
                self.pos = pos
                return

    def _string_end(self, buf: bytearray, pos: int) -> Optional[int]:
        """The end (after its closing quote) of the string that starts at ``pos``,
        or None while it runs on (``scan`` then says where to resume)."""
        m = _STRING_REST.match(buf, self.scan or pos + 1)
        if m.group(1) is None:
            self.scan = m.end()
            return None
        self.scan = 0
        return m.end()

    def _value(self, buf: bytearray, start: int, end: int) -> None:
        key = self.key
        if key in _WANTED:
            raw = bytes(buf[start:end])
            if key == "model":
                if raw[:1] != b'"':
                    raise BodyError("model must be a string")
                self.model = _decode_string(raw)
                self.model_span = (start, end)
            elif key in PROMPT_KEYS:
                if self.prompt_span is not None and self.prompt_span[0] == start:
                    self.prompt_span = (start, end)
            elif raw != b"null":
                try:
                    value = json.loads(raw)
                except ValueError:
                    raise BodyError(f"{key} must be an integer") from None
                if type(value) is not int or value < 1:
                    raise BodyError(f"{key} must be an integer >= 1")
                self.max_tokens = value
                self.limit_spans.append((start, end))
        self.pos, self.state = end, _NEXT


def _decode_string(raw: bytes) -> str:
    try:
        value = json.loads(raw)
    except ValueError:
        raise BodyError("invalid JSON string") from None
    if not isinstance(value, str):
        raise BodyError("invalid JSON string")
    return value
