"""The round instruction: every field checked, errors naming the field and the place."""

from __future__ import annotations

import math

import pytest

from common.protocol import RoundInstruction
from common.wire import WireError

GOOD = RoundInstruction("policy", "train", 2, 10, 1, 15, "run-key", 0, beta=0.1)


def test_round_trip():
    assert RoundInstruction.from_config(GOOD.to_config(), "here") == GOOD


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("beta", -0.1, "'beta' must be finite and >= 0"),
        ("beta", math.nan, "'beta' must be finite and >= 0"),
        ("beta", math.inf, "'beta' must be finite and >= 0"),
        ("beta", 1, "field 'beta' must be float"),
        ("phase", "sft", "unknown phase 'sft'"),
        ("round", 11, "round 11 outside 1..10"),
        ("server_round", True, "field 'server_round' must be int"),
    ],
)
def test_bad_fields_are_refused_naming_the_field_and_the_place(field, value, message):
    config = {**GOOD.to_config(), field: value}
    with pytest.raises(WireError, match="node 7, message ab12") as info:
        RoundInstruction.from_config(config, "node 7, message ab12")
    assert message in str(info.value)


def test_missing_field_is_named():
    config = GOOD.to_config()
    del config["beta"]
    with pytest.raises(WireError, match="lacks field 'beta'"):
        RoundInstruction.from_config(config, "node 7")
