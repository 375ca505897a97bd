import numpy as np
import pytest
import torch

from common.wire import (
    REWARD_STATS,
    TensorSpec,
    WireError,
    from_named_arrays,
    from_ndarrays,
    pack_update,
    spec_of,
    to_ndarrays,
    unpack_update,
)

STATE = {"adapter.a": torch.ones(2, 3), "head.weight": torch.zeros(1, 3)}
SPEC = spec_of(STATE)


def test_round_trip():
    back = from_ndarrays(to_ndarrays(STATE, SPEC), SPEC, "test")
    assert set(back) == set(STATE) and all(torch.equal(back[k], STATE[k]) for k in STATE)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ([np.ones((2, 3), np.float32)], "1 tensors arrived, expected 2"),
        (
            [np.ones((3, 2), np.float32), np.zeros((1, 3), np.float32)],
            "'adapter.a' has shape \\(3, 2\\)",
        ),
        (
            [np.ones((2, 3), np.float64), np.zeros((1, 3), np.float32)],
            "'adapter.a' has dtype float64",
        ),
        (
            [np.ones((2, 3), np.float32), np.array([[0, np.nan, 0]], np.float32)],
            "'head.weight' holds 1 NaN/Inf",
        ),
        (
            [np.ones((2, 3), np.float32), np.array([[np.inf, 0, 0]], np.float32)],
            "'head.weight' holds 1 NaN/Inf",
        ),
        ([np.ones((2, 3), np.float32), "not an array"], "'head.weight' is a str"),
    ],
)
def test_bad_arrays_are_refused_naming_the_tensor(arrays, message):
    with pytest.raises(WireError, match=message):
        from_ndarrays(arrays, SPEC, "global weights, round 4")


def test_named_arrays_refuse_missing_and_unexpected_names():
    with pytest.raises(
        WireError, match=r"missing tensors \['head.weight'\], unexpected tensors \['evil'\]"
    ):
        from_named_arrays(
            {"adapter.a": np.ones((2, 3), np.float32), "evil": np.ones(1, np.float32)}, SPEC, "x"
        )


def test_stats_encode_and_decode_sums():
    values = {"eval_pairs": 120.0, "eval_correct": 77.0, "eval_loss_sum": 80.5}
    encoded = REWARD_STATS.encode(values)
    assert np.abs(encoded).max() <= 1.0
    decoded = REWARD_STATS.decode_sum(encoded + encoded)
    assert decoded["eval_correct"] == pytest.approx(154.0, rel=1e-6)
    assert decoded["eval_loss_sum"] == pytest.approx(161.0, rel=1e-6)


def test_stats_refuse_out_of_bound_and_unknown_fields():
    values = dict.fromkeys(REWARD_STATS.names, 0.0)
    with pytest.raises(WireError, match="outside"):
        REWARD_STATS.encode(values | {"eval_pairs": 1e9})
    with pytest.raises(WireError, match="do not match the layout"):
        REWARD_STATS.encode(values | {"prompt_text": 1.0})


def test_pack_refuses_values_secagg_would_clip():
    stats = REWARD_STATS.encode(dict.fromkeys(REWARD_STATS.names, 0.0))
    with pytest.raises(WireError, match="'adapter.a' has \\|value\\| 5 > secagg clipping range 4"):
        pack_update(
            {"adapter.a": torch.full((2, 3), 5.0), "head.weight": torch.zeros(1, 3)},
            SPEC,
            stats,
            4.0,
        )
    arrays = pack_update(STATE, SPEC, stats, 4.0)
    update, back = unpack_update(arrays, SPEC, REWARD_STATS, "x")
    assert np.array_equal(back, stats) and torch.equal(update["adapter.a"], STATE["adapter.a"])
    # A reward training round's reply: the update alone; a stats array more is refused.
    update, none = unpack_update(pack_update(STATE, SPEC, None, 4.0), SPEC, None, "x")
    assert none is None and torch.equal(update["head.weight"], STATE["head.weight"])
    with pytest.raises(WireError, match="3 tensors arrived, expected 2"):
        unpack_update(arrays, SPEC, None, "x")


def test_spec_numel():
    assert TensorSpec("x", (2, 3)).numel == 6
