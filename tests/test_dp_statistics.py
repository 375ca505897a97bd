import numpy as np
import pytest
import torch

from common.config import RunConfig
from common.dp_randomness import SeededRandomness
from common.dp_statistics import (
    clipped_sums,
    future_statistics,
    noise_std,
    noised,
    planned_releases,
    releases_left,
    statistics_event,
    statistics_noise_multiplier,
)
from common.privacy import DPEvent, epsilon
from common.protocol import RoundInstruction
from common.wire import POLICY_STATS, REWARD_STATS

CONFIG = RunConfig()  # 12 reward rounds, 10 policy rounds, epsilon 8, share 0.1
PROMPTS = 2000


def instruction(phase: str, task: str, round_: int, rounds: int) -> RoundInstruction:
    return RoundInstruction(phase, task, round_, rounds, 1, 1, "run", 0)


def test_a_unit_moves_the_normalized_statistics_by_at_most_sqrt_fields():
    """The sensitivity the noise is calibrated for, on extreme and random units."""
    rng = np.random.default_rng(0)
    for layout in (REWARD_STATS, POLICY_STATS):
        rows = rng.normal(0, 50, size=(40, len(layout.fields)))  # far outside every bound
        base = np.array(list(clipped_sums(rows, layout).values()))
        for extra in [np.full(len(layout.fields), 1e6), -np.full(len(layout.fields), 1e6), *rows]:
            more = np.array(list(clipped_sums(np.vstack([rows, extra]), layout).values()))
            moved = np.linalg.norm((more - base) / layout.unit_bounds)
            assert moved <= np.sqrt(len(layout.fields)) + 1e-9


def test_clipped_sums_clip_each_unit_to_its_field_bound():
    rows = np.array([[1.0, 1.0, 0.3], [1.0, 0.0, 9.0]])  # the second pair's loss 9 > clip 4
    assert clipped_sums(rows, REWARD_STATS) == {
        "eval_pairs": 2.0,
        "eval_correct": 1.0,
        "eval_loss_sum": pytest.approx(4.3),
    }


def test_the_noise_has_the_std_the_accounting_assumes():
    sums = dict.fromkeys(POLICY_STATS.names, 10.0)
    randomness = SeededRandomness(torch.device("cpu"), 0)
    draws = np.array(
        [list(noised(sums, POLICY_STATS, 2.0, randomness).values()) for _ in range(4000)]
    )
    expected = noise_std(POLICY_STATS, 2.0)
    assert expected["kl_sum"] == pytest.approx(2.0 * np.sqrt(5) * 8.0)
    for i, name in enumerate(POLICY_STATS.names):
        assert draws[:, i].std() == pytest.approx(expected[name], rel=0.05)
        assert abs(draws[:, i].mean() - 10.0) < 4 * expected[name] / np.sqrt(len(draws))


def test_the_planned_releases_alone_spend_the_statistics_share():
    sigma = statistics_noise_multiplier(CONFIG, PROMPTS)
    events = [DPEvent(sigma, q, n) for q, n in planned_releases(CONFIG, PROMPTS)]
    spent = epsilon(events, CONFIG.privacy.delta, CONFIG.privacy.accountant)
    assert spent == pytest.approx(0.1 * 8.0, rel=2e-3) and spent <= 0.8
    # Ten policy rounds, each releasing once (the candidate's measurement with the
    # trust region on the aggregate, else the training round's own), + the end.
    assert planned_releases(CONFIG, PROMPTS) == [(1.0, 1), (256 / PROMPTS, 11)]


@pytest.mark.parametrize("task", ["train", "measure"])
def test_the_releases_each_round_counts_ahead_add_up_to_the_plan(task):
    # A reward training round releases nothing; the final evaluation once.
    assert releases_left(instruction("reward", "train", 1, 12)) == 1
    assert releases_left(instruction("reward", "evaluate", 12, 12)) == 1
    # Policy round r of R (its training or its candidate's measurement): r..R, the end.
    assert releases_left(instruction("policy", task, 1, 10)) == 11
    assert releases_left(instruction("policy", task, 10, 10)) == 2
    assert releases_left(instruction("policy", "evaluate", 10, 10)) == 1
    event = statistics_event(CONFIG, instruction("policy", task, 4, 10), PROMPTS)
    assert event.sample_rate == 256 / PROMPTS and event.steps == 1
    ahead = future_statistics(CONFIG, instruction("policy", task, 4, 10), PROMPTS)
    assert ahead == [DPEvent(event.noise_multiplier, event.sample_rate, 8)]
