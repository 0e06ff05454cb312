"""The fast skip of streaming envelopes (pipeline/ingest/decode.py, "Fast skip").

Rows that cannot be DLP are counted as skipped without being parsed, walked or scrubbed; no DLP
row is missed, whatever its casing, its \\u escapes or its embedding; a body that is not JSON is
still refused as a whole; the DLP rows come out exactly as the full path decodes them.
"""

from __future__ import annotations

import copy
import json
import random

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks import streams
from pipeline.errors import DecodeError
from pipeline.ingest import decode, limits
from pipeline.ingest.decode import decode_message
from pipeline.ingest.formats import common, defender_streaming, registry
from tests.support.streaming import dense_body_with

HAS_MSGSPEC = decode.msgspec is not None
PATHS = ["msgspec", "orjson"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Each test runs on both ways of reading an envelope: msgspec (when installed) and orjson."""
    if request.param == "msgspec" and not HAS_MSGSPEC:
        pytest.skip("msgspec is not installed: only the orjson path runs")
    if request.param == "orjson":
        monkeypatch.setattr(decode, "msgspec", None)
    return request.param


def full_path(body: bytes) -> decode.Decoded:
    """What decoding gives without any shortcut: every row checked, scrubbed and decoded."""
    decoder = registry.lookup("defender_streaming")
    rows = orjson.loads(body)["records"]
    return decode._decode_envelope(decoder, rows, limits.DEFAULT_LIMITS, clean=False, checked=False)


def outcome(decoded: decode.Decoded) -> tuple:
    return (
        decoded.format,
        decoded.records,
        [alert.to_json() for alert in decoded.alerts],
        [(part.alert_id, part.rank, orjson.dumps(part.data, option=orjson.OPT_SORT_KEYS)) for part in decoded.parts],
        [(r.index, r.reason, r.detail, r.record) for r in decoded.rejected],
    )


def dlp_outcome(decoded: decode.Decoded) -> tuple:
    """The outcome less the rejections of rows that cannot be DLP (the full path rejects non-DLP rows
    that break a limit; the fast skip counts them as skipped)."""
    return outcome(decoded)[:4]


# --- the defects of issue 19 ------------------------------------------------------------------

def test_escaped_backslashes_of_windows_paths_are_not_taken_for_u_escapes():
    body = orjson.dumps({"records": [{"properties": {"FolderPath": "C:\\Users\\user0001\\update.exe", "X": "c:\\users\\ubuntu"}}]})
    assert b"\\\\u" in body  # what the old test looked for
    assert not limits.has_unicode_escape(body)
    assert limits.records_surely_within(body, limits.DEFAULT_LIMITS)  # the byte-level proof holds again
    assert not common.mentions_removed_key(body)
    assert limits.has_unicode_escape(b'"\\u0041"') and limits.has_unicode_escape(b'"\\\\\\u00e9"')
    assert limits.has_unicode_escape(b'"{\\"a\\": \\"\\\\u0044\\"}"')  # an escape of embedded JSON


class CallCounter:
    """Counts the calls of a real function and calls it (observes, replaces nothing)."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


@pytest.mark.usefixtures("path")
def test_rows_that_cannot_be_dlp_are_neither_walked_nor_scrubbed(monkeypatch):
    bodies = streams.mixed_bodies(6, 0.0, seed=3)  # EmailEvents rows with a Subject, Windows paths
    assert all(b'"Subject"' in body for body in bodies)
    scrub = CallCounter(common.scrub)
    walk = CallCounter(limits.check_record)
    monkeypatch.setattr(common, "scrub", scrub)
    monkeypatch.setattr(decode, "check_record", walk)
    for body in bodies:
        decoded = decode_message(body)
        assert decoded.skipped == decoded.records == 100 and not decoded.parts and not decoded.rejected
    assert scrub.calls == 0 and walk.calls == 0


@pytest.mark.usefixtures("path")
def test_a_subject_in_another_row_does_not_scrub_the_dlp_rows(monkeypatch):
    bodies = [body for body in streams.mixed_bodies(12, 0.04, seed=4) if b"Data Loss Prevention" in body]
    scrub = CallCounter(common.scrub)
    monkeypatch.setattr(common, "scrub", scrub)
    parts = sum(len(decode_message(body).parts) for body in bodies)
    assert parts > 0 and scrub.calls == 0  # the DLP rows name no removed key: nothing to scrub


# --- same output as the full path -------------------------------------------------------------

@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.02])
def test_dlp_rows_of_the_mixed_streams_decode_byte_identical(fraction):
    bodies = streams.mixed_bodies(40, fraction, seed=21)
    for body in bodies:
        fast, full = decode_message(body), full_path(body)
        assert outcome(fast) == outcome(full)
        assert fast.skipped == full.skipped
    assert sum(len(decode_message(body).parts) for body in bodies) == 4 * streams.mixed_alerts(bodies)


@pytest.mark.usefixtures("path")
def test_the_dlp_dense_stream_decodes_byte_identical():
    for body in streams.dense_bodies(3):
        fast = decode_message(body)
        assert outcome(fast) == outcome(full_path(body)) and len(fast.parts) == 100 and fast.skipped == 0


@pytest.mark.usefixtures("path")
def test_a_dlp_dense_body_is_searched_for_removed_keys_once_not_per_row(monkeypatch):
    body = streams.dense_bodies(1)[0]
    search = CallCounter(common.mentions_removed_key)
    scrub = CallCounter(common.scrub)
    monkeypatch.setattr(common, "mentions_removed_key", search)
    monkeypatch.setattr(common, "scrub", scrub)
    decoded = decode_message(body)
    assert len(decoded.parts) == 100 and not decoded.rejected
    expected = 1 if HAS_MSGSPEC and decode.msgspec is not None else 100  # the orjson path proves each row from its own bytes
    assert search.calls == expected and scrub.calls == 0


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("spoiler", ["removed_key", "u_escape"])
def test_one_row_that_needs_scrubbing_spoils_the_proof_of_a_dlp_dense_body(spoiler, monkeypatch):
    """A removed key (in a row's AdditionalFields) or a \\u escape anywhere in a dense body: the body
    proves nothing, each row is searched on its own, and the row that names the key is scrubbed."""
    def spoil(rows):
        evidence = rows[2]["properties"]  # the file evidence of the first alert
        extra = json.loads(evidence["AdditionalFields"])
        if spoiler == "removed_key":
            extra["DetectedValues"] = [{"Name": "Credit Card Number", "Value": "4111 1111 1111 1111"}]
            evidence["AdditionalFields"] = json.dumps(extra)
        else:
            rows[50]["properties"]["Title"] += " \\u00e9"  # a backslash and u00e9 in another alert's row: taken for a \\u escape

    body = dense_body_with(spoil)
    assert common.mentions_removed_key(body)
    scrub = CallCounter(common.scrub)
    monkeypatch.setattr(common, "scrub", scrub)
    fast = decode_message(body)
    assert scrub.calls >= 1  # the spoiled row is scrubbed (its evidence fields are copied by name, so the value could not show)
    assert outcome(fast) == outcome(full_path(body)) and len(fast.parts) == 100
    assert b"4111" not in orjson.dumps([part.data for part in fast.parts])


# --- no DLP row is missed ---------------------------------------------------------------------

def escape_letters(text: bytes, choose) -> bytes:
    """`text` (JSON) with the letters inside its strings spelled as \\u escapes where `choose(i)` says
    so (keys and values alike; the JSON stays equal)."""
    out = bytearray()
    in_string = escaped = False
    for index, byte in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
            elif chr(byte).isalpha() and choose(index):
                out += b"\\u%04x" % byte if choose(-index) else b"\\u%04X" % byte
                continue
        elif byte == 0x22:
            in_string = True
        out.append(byte)
    return bytes(out)


def recase(text: str, flips: list[bool]) -> str:
    return "".join(ch.upper() if flips[i % len(flips)] else ch.lower() for i, ch in enumerate(text))


_SAMPLE = json.loads((streams.SAMPLES / "01-defender-streaming-batch.json").read_text())["records"]
_CLOUD_APP = json.loads((streams.SAMPLES / "05-management-activity.json").read_text())[0]


def cloud_app_row(raw_event_data: str) -> dict:
    return {"time": "2025-03-14T09:00:00Z", "tenantId": streams.TENANT, "category": "AdvancedHunting-CloudAppEvents",
            "properties": {"Timestamp": "2025-03-14T09:00:00Z", "ActionType": "DlpRuleMatch", "RawEventData": raw_event_data}}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flips=st.lists(st.booleans(), min_size=1, max_size=25),
    seed=st.integers(0, 2**32 - 1),
    escape_share=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    which=st.sampled_from(["service", "detection", "operation"]),
    inner_escapes=st.booleans(),
    fast=st.booleans(),
)
def test_no_dlp_row_is_missed_in_any_casing_escaped_or_embedded(flips, seed, escape_share, which, inner_escapes, fast):
    rng = random.Random(seed)
    noise = [streams._row(rng, index) for index in range(6)]
    if which == "operation":
        raw = copy.deepcopy(_CLOUD_APP)
        raw["Operation"] = recase("DlpRuleMatch", flips)
        inner = orjson.dumps(raw)
        if inner_escapes:  # \u escapes of the embedded JSON itself: `\\u0044` in the body
            inner = escape_letters(inner, lambda i: rng.random() < 0.5)
        row = cloud_app_row(inner.decode())
    else:
        row = copy.deepcopy(_SAMPLE[0])
        key = "ServiceSource" if which == "service" else "DetectionSource"
        row["properties"]["ServiceSource"] = row["properties"]["DetectionSource"] = "Microsoft Defender"
        row["properties"][key] = recase("Microsoft Data Loss Prevention", flips)
    rows = noise[:3] + [row] + noise[3:]
    body = escape_letters(orjson.dumps({"records": rows}), lambda i: rng.random() < escape_share)
    assert orjson.loads(body) == {"records": rows}  # the same JSON, spelled otherwise
    saved = decode.msgspec
    try:
        if not fast:
            decode.msgspec = None
        decoded = decode_message(body)
    finally:
        decode.msgspec = saved
    full = full_path(body)
    assert len(full.alerts) + len(full.parts) == 1  # the row is DLP...
    assert dlp_outcome(decoded) == dlp_outcome(full)  # ...and the fast skip finds it, decoded the same
    assert decoded.skipped == 6


@settings(max_examples=200, deadline=None)
@given(category=st.sampled_from([defender_streaming.ALERT_INFO, defender_streaming.ALERT_EVIDENCE, defender_streaming.CLOUD_APP_EVENTS, "Other"]),
       service=st.one_of(st.none(), st.text(max_size=40), st.sampled_from(["Data Loss Prevention", "DATA LOSS PREVENTION x"])),
       operation=st.one_of(st.text(max_size=14), st.sampled_from(["DLPRuleMatch", "dlprulematch", "DlpRuleMatcH"])))
def test_row_may_be_dlp_turns_down_only_rows_the_decoder_skips(category, service, operation):
    raw = orjson.dumps({**_CLOUD_APP, "Operation": operation}).decode()
    row = {"category": category, "tenantId": "t", "properties": {
        **_SAMPLE[0]["properties"], "ServiceSource": service, "DetectionSource": None, "RawEventData": raw}}
    if not defender_streaming.parsed_row_may_be_dlp(row):
        decoded = full_path(orjson.dumps({"records": [row]}))
        assert decoded.skipped == 1 and not decoded.alerts and not decoded.parts and not decoded.rejected


# --- a body that is not JSON is still refused ---------------------------------------------------

@pytest.mark.usefixtures("path")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 10**6), junk=st.sampled_from([b"", b"\xff", b"\xed\xa0\x80", b"}", b"\\", b'"', b",", b"\\ud800", b"NaN"]))
def test_a_body_that_is_not_json_is_refused_as_a_whole(cut, junk):
    body = _MIXED_BODY
    at = cut % len(body)
    broken = body[:at] + junk + body[at + (1 if junk else 0):]
    try:
        orjson.loads(broken)
    except orjson.JSONDecodeError:
        with pytest.raises(DecodeError) as caught:
            decode_message(broken)
        assert caught.value.reason == "invalid_json"
    else:  # still JSON: decoded, or refused for its shape, never as invalid JSON
        try:
            decode_message(broken)
        except DecodeError as exc:
            assert exc.reason != "invalid_json"


_MIXED_BODY = streams.mixed_bodies(1, 0.04, seed=31)[0][:20_000].rsplit(b',{"time"', 1)[0] + b"]}"


@pytest.mark.usefixtures("path")
def test_a_repeated_key_is_read_as_orjson_reads_it_the_last_one():
    dlp = '{"ServiceSource": "Microsoft Data Loss Prevention", "AlertId": "a1", "Title": "t"}'
    bodies = [
        '{"records": [{"category": "Other", "category": "AdvancedHunting-AlertInfo", "properties": ' + dlp + "}]}",
        '{"records": [{"category": "AdvancedHunting-AlertInfo", "properties": {"ServiceSource": "x"}, "properties": ' + dlp + "}]}",
        '{"records": [{"category": "AdvancedHunting-AlertInfo", "properties": {"ServiceSource": "x", "ServiceSource": "Data Loss Prevention", "AlertId": "a"}}]}',
    ]
    for body in bodies:
        decoded = decode_message(body.encode())
        assert len(decoded.parts) == 1 and decoded.skipped == 0 and outcome(decoded) == outcome(full_path(body.encode()))


# --- DLP-dense bodies: one search of the body for the limits' proofs ---------------------------

# Texts made of the pieces both searches turn on: backslashes alone and in runs, `u`, hex digits and
# letters that are not, whole escapes and near misses, and other bytes.
_ESCAPE_PIECES = st.sampled_from([b"\\", b"\\\\", b"\\\\\\", b"u", b"U", b"0", b"9", b"a", b"F", b"g", b"x", b'"', b"{", b" ",
                                  b"\\u00e9", b"\\u00E9", b"\\u123", b"\\u12", b"\\uZZZZ", b"\\\\u0041", b"\xc3\xa9"])


@given(st.lists(_ESCAPE_PIECES, max_size=24).map(b"".join))
def test_one_search_for_escapes_and_deep_embedding_finds_what_the_two_searches_find(text):
    assert limits.escape_or_deep_embedding(text) == (limits.has_unicode_escape(text) or b"\\\\\\" in text)


def _deep(rows):
    nested: object = 1
    for _ in range(40):
        nested = [nested]
    rows[5]["properties"]["Nested"] = nested


def _long(rows):
    rows[6]["properties"]["Long"] = "x" * (limits.DEFAULT_LIMITS.max_string_length + 1)


def _deep_embedded(rows):  # JSON in JSON in a string: three backslashes in a row, the body proves no row
    rows[7]["properties"]["AdditionalFields"] = json.dumps({"Inner": json.dumps({"Deeper": json.dumps({"x": 1})}), "DlpRuleName": "r"})


def _no_alert_id(rows):
    rows[9]["properties"]["AlertId"] = None


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("change", [_deep, _long, _deep_embedded, _no_alert_id], ids=["too_deep", "string_too_long", "deep_embedding", "rejected"])
def test_a_dlp_dense_body_rejects_its_broken_rows_as_the_full_path_does(change):
    """The body-wide proofs leave each row's length and brackets to count: a row beyond a limit is
    still rejected with the limit's reason, one the decoder rejects is dead-lettered whole, and every
    other row decodes as the full path decodes it."""
    body = dense_body_with(change)
    fast, full = decode_message(body), full_path(body)
    assert outcome(fast) == outcome(full)
    assert len(fast.rejected) == (0 if change is _deep_embedded else 1) and len(fast.parts) == 100 - len(fast.rejected)
