"""JSON bodies: parsed whole by the native parser up to `codecs.NATIVE_BYTES` and
`NATIVE_VALUES`, in steps above them, with the same values and the same refusals as before it
(the oracle: `parse_json` as it was, the stdlib's parser whole up to the window and the
stepwise parser above)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import pytest
from _pytest.mark import ParameterSet
from hypothesis import given, settings
from hypothesis import strategies as st

from zmem_service.errors import BadRequest, ValidationFailed, ZMemError
from zmem_service.http import codecs, jsonchunks

from .test_bad_input import CASES, Case, populate, send

WINDOW = jsonchunks.WINDOW


def stdlib_parse(body: bytes, max_values: int | None = None) -> Any:
    """`codecs.parse_json` as it was before the native parser: the oracle."""
    try:
        text = body.decode("utf-8")
        if len(body) <= WINDOW:
            return json.loads(text)
        if max_values is not None:
            count = jsonchunks.count_values(text, max_values)
            if count > max_values:
                raise ValidationFailed.at(
                    ["body"],
                    f"{count} JSON arrays, objects and members; at most {max_values} "
                    "(for this service's max_batch rows or episodes)",
                )
        return jsonchunks.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest("body is not valid JSON: nested too deeply") from None


@contextmanager
def native_off() -> Iterator[None]:
    """The service's JSON bodies parsed as before the native parser."""
    with mock.patch.object(codecs, "parse_json", stdlib_parse):
        yield


def outcome(body: bytes, max_values: int | None) -> tuple[Any, ...]:
    """What `parse_json` gives: the value's repr (tells 1 from 1.0, shows NaN and key order),
    or the refusal's class, detail and errors."""
    try:
        return ("value", repr(codecs.parse_json(body, max_values)))
    except ZMemError as e:
        return (type(e).__name__, e.detail, e.errors)


def assert_same(body: bytes, max_values: int | None = None) -> None:
    native = outcome(body, max_values)
    with native_off():
        assert native == outcome(body, max_values), body[:200]


scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # past 64 bits too: the stdlib keeps them exact
    | st.floats()  # NaN and infinities, written as bare tokens
    | st.text(max_size=8)  # lone surrogates too
)
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=4), inner, max_size=5),
)


@settings(max_examples=300, deadline=None)
@given(
    value=documents,
    ascii_only=st.booleans(),
    indent=st.none() | st.integers(0, 2),
    padded=st.booleans(),
    cut=st.none() | st.integers(0, 1000),
    insert=st.sampled_from(["", ",", "]", "}", '"', "\\", "1", "-", "e", "[", "{", ":", " ", "\x00"]),
    max_values=st.none() | st.integers(0, 40),
)
def test_a_body_parses_to_what_the_stdlib_gives_or_is_refused_in_its_words(
    value: Any,
    ascii_only: bool,
    indent: int | None,
    padded: bool,
    cut: int | None,
    insert: str,
    max_values: int | None,
) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only, indent=indent)
    if cut is not None:  # a changed document: invalid, or another value
        cut %= len(text) + 1
        text = text[:cut] + insert + text[cut + 1 :]
    body = text.encode("utf-8", "surrogatepass")  # a lone surrogate is invalid UTF-8: a 400
    if padded:  # past the window: counted, and parsed whole or in steps by its size
        body += b" " * WINDOW
    assert_same(body, max_values)


@pytest.mark.parametrize(
    "text",
    [
        "NaN",
        '{"z": [Infinity, -Infinity, NaN]}',
        "[1e400, -1e400, 1.7976931348623157e309]",
        "123456789012345678901234567890",
        "[-9223372036854775809, 18446744073709551616]",
        '{"a": 1, "b": 2, "a": {"c": 3}}',
        '"\\ud800"',
        '"\\udfff and \\ud83d\\ude00"',
        "\ufeff[1]",
        "[" * 300 + "]" * 300,  # past the native parser's nesting, within the stdlib's
        "[" * 2000 + "]" * 2000,
        "[true, false, null, -0, -0.0, 1E+2, 0.1e-400]",
        "[1,]",
        "[01]",
        '{"a" 1}',
        "[1] x",
        "",
        '"\x01"',
    ],
)
@pytest.mark.parametrize("padded", [False, True], ids=["small", "past-the-window"])
def test_what_the_parsers_disagree_on_is_the_stdlibs(text: str, padded: bool) -> None:
    body = text.encode() + (b" " * WINDOW if padded else b"")
    assert_same(body, 10_000)


def _stepwise_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    loads = jsonchunks.loads

    def counted(text: str) -> Any:
        calls.append(len(text))
        return loads(text)

    monkeypatch.setattr(jsonchunks, "loads", counted)
    return calls


def test_bodies_up_to_the_cutoff_are_parsed_whole_and_larger_ones_in_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _stepwise_calls(monkeypatch)
    numbers = codecs.NATIVE_BYTES // 4  # "0.5," or ", 0.5" is 4 to 5 bytes

    def z_of(n: int) -> bytes:
        return json.dumps({"z": [0.5] * n}, separators=(",", ":")).encode()

    small, large = z_of(numbers - 10), z_of(numbers + 10)
    assert len(small) <= codecs.NATIVE_BYTES < len(large)
    assert codecs.parse_json(small, 100) == {"z": [0.5] * (numbers - 10)}
    assert calls == []
    assert codecs.parse_json(large, 100) == {"z": [0.5] * (numbers + 10)}
    assert calls == [len(large)]


def test_bodies_of_many_arrays_are_parsed_in_steps_however_small(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _stepwise_calls(monkeypatch)

    def arrays(n: int) -> bytes:  # the object, its member and its list count too
        return ('{"z": [' + ",".join(["[]"] * (n - 3)) + "]}").encode()

    at, past = arrays(codecs.NATIVE_VALUES), arrays(codecs.NATIVE_VALUES + 1)
    assert WINDOW < len(at) < len(past) <= codecs.NATIVE_BYTES
    assert codecs.parse_json(at, 10**6) == json.loads(at)
    assert calls == []
    assert codecs.parse_json(past, 10**6) == json.loads(past)
    assert calls == [len(past)]


def _json_cases() -> list[Case]:
    cases = [c.values[0] if isinstance(c, ParameterSet) else c for c in CASES]
    return [
        c
        for c in cases
        if isinstance(c, Case)
        and c.content_type == "application/json"
        and not callable(c.body)
        and not c.settings
        and c.method == "POST"
    ]


def test_every_bad_json_body_gets_the_same_answer_as_with_the_stdlib_alone(make_client) -> None:  # type: ignore[no-untyped-def]
    """test_bad_input's JSON bodies, as they are and padded past the window: the same status and
    problem+json (the field named, the 400's words) with the native parser as without it."""
    client = make_client(capacity=1000, min_size=10)
    populate(client, per_request=100)
    cases = _json_cases()
    assert len(cases) >= 40
    for case in cases:
        body = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
        for sent in (body, body + b" " * WINDOW):
            variant = dataclasses.replace(case, body=sent)
            native = send(client, variant)
            with native_off():
                stdlib = send(client, variant)
            assert (native.status_code, native.json()) == (stdlib.status_code, stdlib.json()), case.id
            assert native.status_code == case.status or len(sent) > len(body), case.id
