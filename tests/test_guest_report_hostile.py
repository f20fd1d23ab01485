"""The parser of guest hook reports against anything a guest could write there."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freezeframe.errors import AgentProtocolError
from freezeframe.targets.guest_hooks import FORMAT, parse_hook_result

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
entries = st.fixed_dictionaries(
    {"name": st.text(max_size=40), "status": st.sampled_from(["ok", "failed", "refused"])},
    optional={"duration_ms": st.floats(min_value=0, max_value=1e6), "output": st.text(max_size=100),
              "error": st.text(max_size=50)},
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=400), json_values.map(lambda v: json.dumps(v).encode()),
                 st.fixed_dictionaries({"format": st.just(FORMAT), "freeze": json_values, "thaw": json_values})
                 .map(lambda v: json.dumps(v).encode())))
def test_any_report_is_parsed_or_refused_with_a_protocol_error(data: bytes) -> None:
    try:
        result = parse_hook_result(data)
    except AgentProtocolError:
        return
    assert all(w["where"] == "guest" for w in result["writers"])


@settings(max_examples=200, deadline=None)
@given(st.lists(entries, max_size=8), st.lists(entries, max_size=8))
def test_well_formed_reports_give_one_writer_per_frozen_hook(freeze: list[dict[str, Any]],
                                                            thaw: list[dict[str, Any]]) -> None:
    data = json.dumps({"format": FORMAT, "freeze": freeze, "thaw": thaw}).encode()
    result = parse_hook_result(data)
    assert [w["name"] for w in result["writers"]] == [e["name"][:255] for e in freeze]
    for writer, entry in zip(result["writers"], freeze, strict=True):
        if entry["status"] != "ok":
            assert writer["status"] in ("failed", "refused")
        assert len(writer["manifest"]["freeze_output"]) <= 8192 + 3


def test_oversized_and_out_of_range_reports_are_refused() -> None:
    with pytest.raises(AgentProtocolError, match="more than"):
        parse_hook_result(b" " * ((1 << 20) + 1))
    too_many = {"format": FORMAT, "freeze": [{"name": "h", "status": "ok"}] * 300}
    with pytest.raises(AgentProtocolError, match="at most 256"):
        parse_hook_result(json.dumps(too_many).encode())
    negative = {"format": FORMAT, "freeze": [{"name": "h", "status": "ok", "duration_ms": -1}]}
    with pytest.raises(AgentProtocolError, match="non-negative"):
        parse_hook_result(json.dumps(negative).encode())
    huge_output = {"format": FORMAT, "freeze": [{"name": "h", "status": "ok", "output": "x" * 100_000}]}
    assert len(parse_hook_result(json.dumps(huge_output).encode())["writers"][0]["manifest"]["freeze_output"]) \
        == 8192 + 3
