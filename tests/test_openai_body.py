"""BodyScanner against json.loads: same model, max_tokens and prompt value, whatever
the chunking; and the compiled scanner against its pure-Python twin, state for
state and error for error, on bodies and on garbage."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from geoserve import _compat
from geoserve.integrations import openai_body
from geoserve.integrations.openai_body import BodyError

IMPLEMENTATIONS = ["python"] + (["native"] if _compat.compiled_bodyscan is not None else [])


@pytest.fixture(params=IMPLEMENTATIONS, scope="module")
def BodyScanner(request):  # noqa: N802 (the class under test)
    return _compat.kernels(request.param, "bodyscan").BodyScanner


def test_the_gateways_use_the_compiled_scanner_where_built():
    assert openai_body.BodyScanner is _compat.kernels(None, "bodyscan").BodyScanner
    if _compat.native:
        assert openai_body.BodyScanner is _compat.compiled_bodyscan.BodyScanner

TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)) | st.sampled_from(list('"\\{}[],: \n')),
               max_size=40)
SCALARS = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False) | TEXT
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                      max_leaves=12)
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user"]), "content": TEXT}), min_size=1,
                    max_size=4)


@st.composite
def bodies(draw):
    body = {}
    keys = draw(st.permutations(["model", "messages", "max_tokens", "stream", "extra", "prompt"]))
    for key in keys[: draw(st.integers(1, len(keys)))]:
        if key == "model":
            body[key] = draw(TEXT)
        elif key == "messages":
            body[key] = draw(MESSAGES)
        elif key == "prompt":
            body[key] = draw(TEXT)
        elif key == "max_tokens":
            body[key] = draw(st.integers(1, 4096))
        else:
            body[key] = draw(VALUES)
    separators = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")]))
    raw = json.dumps(body, separators=separators, ensure_ascii=draw(st.booleans())).encode()
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=6)))
    return body, raw, cuts


def feed_all(BodyScanner, raw: bytes, cuts: list):  # noqa: N803
    scanner = BodyScanner()
    edges = [0] + cuts + [len(raw)]
    for i in range(len(edges) - 1):
        scanner.feed(raw[edges[i]:edges[i + 1]], end=i == len(edges) - 2)
    return scanner


@given(case=bodies())
def test_scanner_reads_what_json_reads(BodyScanner, case):  # noqa: N803
    body, raw, cuts = case
    scanner = feed_all(BodyScanner, raw, cuts)
    assert scanner.complete
    assert scanner.model == body.get("model")
    assert scanner.max_tokens == body.get("max_tokens")
    first_prompt_key = next((k for k in body if k in ("messages", "prompt")), None)
    if first_prompt_key is None:
        assert scanner.prompt_span is None
    else:
        assert json.loads(scanner.prompt_bytes()) == body[first_prompt_key]
        start, end = scanner.prompt_span
        assert end is not None and raw[start:end] == scanner.prompt_bytes()
    if "model" in body:
        start, end = scanner.model_span
        assert json.loads(raw[start:end]) == body["model"]


@given(case=bodies(), data=st.data())
def test_a_truncated_body_is_an_error_and_the_prefix_is_never_wrong(BodyScanner, case, data):  # noqa: N803
    body, raw, _ = case
    cut = data.draw(st.integers(0, len(raw) - 1))
    scanner = BodyScanner()
    scanner.feed(raw[:cut])  # whatever arrived so far: no error, no wrong value
    if scanner.model is not None:
        assert scanner.model == body["model"]
    if scanner.prompt_span is not None:  # what arrived of the prompt is a prefix of its bytes
        assert raw.startswith(scanner.prompt_bytes(), scanner.prompt_span[0])
        assert scanner.prompt_length() == len(scanner.prompt_bytes())
    with pytest.raises(BodyError):
        scanner.feed(b"", end=True)


@pytest.mark.parametrize("raw,message", [
    (b"[1,2]", "JSON object"),
    (b'"model"', "JSON object"),
    (b'{"model": 7}', "model must be a string"),
    (b'{"model": "m", "max_tokens": "ten"}', "max_tokens"),
    (b'{"model": "m", "max_tokens": 0}', "max_tokens"),
    (b'{"model": "m" "x": 1}', "','"),
    (b'{"model" "m"}', "':'"),
    (b'{model: "m"}', "key"),
    (b'{"model": "m"} x', "after the JSON object"),
    (b'{"model": "m"', "complete JSON object"),
    (b'', "complete JSON object"),
])
def test_malformed_bodies(BodyScanner, raw, message):  # noqa: N803
    with pytest.raises(BodyError, match=message):
        BodyScanner().feed(raw, end=True)


def test_model_before_a_long_prompt_is_known_early(BodyScanner):  # noqa: N803
    prompt = "x" * 200_000
    raw = json.dumps({"model": "chat", "messages": [{"role": "user", "content": prompt}]}).encode()
    scanner = BodyScanner()
    scanner.feed(raw[:8192])
    assert scanner.model == "chat" and scanner.prompt_span == (scanner.prompt_span[0], None)
    assert len(scanner.prompt_bytes()) > 8000
    for i in range(8192, len(raw), 16384):
        scanner.feed(raw[i:i + 16384], end=i + 16384 >= len(raw))
    assert scanner.complete and json.loads(scanner.prompt_bytes())[0]["content"] == prompt


# ---------------------------------------------------------------- kernel vs twin
STATE = ("state", "pos", "scan", "key", "value_start", "depth", "model", "model_span", "max_tokens", "limit_spans",
         "object_start", "prompt_span", "ended")


def observe(scanner, chunk, end):
    """Feed one chunk; what a caller can see afterwards (or the error)."""
    try:
        scanner.feed(chunk, end)
    except BodyError as err:
        return ("error", str(err))
    return tuple(getattr(scanner, k) for k in STATE) + (bytes(scanner.buffer), scanner.complete,
                                                         scanner.prompt_length(), scanner.prompt_bytes())


# JSON-ish bytes: the characters the scanner cares about, escapes, whitespace of
# both kinds it distinguishes, numbers, the wanted keys, and anything else
NOISE = st.lists(st.sampled_from([b"{", b"}", b"[", b"]", b'"', b"\\", b'\\"', b":", b",", b" ", b"\n", b"\t",
                                  b"\x0b", b"\x0c", b"null", b"true", b"1", b"-2", b"3.5", b"1e3", b"0",
                                  b'"model"', b'"prompt"', b'"messages"', b'"max_tokens"', b'"max_completion_tokens"',
                                  b'"m\\u00e9"', b'"\xc3\xa9"', b"\xff", b"\x01", b"a"]), max_size=40).map(b"".join)


@pytest.mark.skipif("native" not in IMPLEMENTATIONS, reason="the compiled kernels are not built")
@given(raw=st.one_of(bodies().map(lambda case: case[1]), NOISE, st.binary(max_size=60)), data=st.data())
def test_the_compiled_scanner_is_its_twin(raw, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=5)))
    edges = [0] + cuts + [len(raw)]
    twin, kernel = (_compat.kernels(k, "bodyscan").BodyScanner() for k in ("python", "native"))
    for i in range(len(edges) - 1):
        chunk, end = raw[edges[i]:edges[i + 1]], i == len(edges) - 2
        seen = observe(twin, chunk, end)
        assert observe(kernel, chunk, end) == seen
        if seen[0] == "error":
            break


def test_a_long_string_is_read_once_not_once_per_chunk(BodyScanner):  # noqa: N803
    """A string that runs over chunk ends resumes where the last chunk's scan
    stopped (``scan``), in a top-level value and inside a nested one; a lone
    backslash at a chunk's end is read again with what follows it."""
    for raw in (json.dumps({"model": "m", "prompt": "ab\"c" * 50_000}).encode(),
                json.dumps({"model": "m", "messages": [{"content": "ab\"c" * 50_000}]}).encode()):
        scanner = BodyScanner()
        for i in range(0, len(raw), 1000):
            chunk = raw[i:i + 1000]
            scanner.feed(chunk, i + 1000 >= len(raw))
            if not scanner.complete and scanner.scan:
                tail = len(scanner.buffer) - (1 if scanner.buffer.endswith(b"\\") else 0)
                assert scanner.pos < scanner.scan == tail  # resumes at the end, not at the string's start
        assert scanner.complete and scanner.scan == 0
        assert json.loads(scanner.prompt_bytes()) == json.loads(raw)[next(k for k in ("prompt", "messages")
                                                                         if k in json.loads(raw))]
