"""`fedrlhf evaluate` and the figures behind it, against values worked out by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from common.config import ModelConfig
from common.model import build_reward_model, load_base, score_responses
from fedrlhf.cli import main as cli
from simulations.evaluation import reward_metrics


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_reward_metrics_by_hand():
    result = reward_metrics([2.0, -1.0, 0.0, 0.5])
    # Right, wrong, a tie (half), right.
    assert result.accuracy == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert result.mean_margin == pytest.approx(1.5 / 4)
    expected_loss = sum(math.log1p(math.exp(-m)) for m in (2.0, -1.0, 0.0, 0.5)) / 4
    assert result.log_loss == pytest.approx(expected_loss)
    # Confidence is the predicted winner's probability: 0.881, 0.731, 0.5, 0.622.
    by_bin = {(b.low, b.high): b for b in result.reliability}
    assert by_bin[(0.5, 0.6)].count == 1 and by_bin[(0.5, 0.6)].accuracy == 0.5
    assert by_bin[(0.6, 0.7)].accuracy == 1.0
    assert by_bin[(0.7, 0.8)].accuracy == 0.0
    assert by_bin[(0.8, 0.9)].mean_confidence == pytest.approx(_sigmoid(2.0))
    assert by_bin[(0.9, 1.0)].count == 0 and by_bin[(0.9, 1.0)].accuracy is None
    ece = (abs(1 - _sigmoid(2)) + abs(0 - _sigmoid(1)) + 0 + abs(1 - _sigmoid(0.5))) / 4
    assert result.expected_calibration_error == pytest.approx(ece)


def test_evaluate_command_scores_a_saved_adapter_as_computed_by_hand(tiny_base_dir, tmp_path):
    base, tokenizer = load_base(str(tiny_base_dir))
    model = build_reward_model(base, ModelConfig(), seed=3)
    with torch.no_grad():  # a head that surely separates the two answers
        model.head.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    adapter = model.save_pretrained(tmp_path / "ckpt")
    prompt, a, b = "How do I cook pasta?", "Simmer it gently.", "Burn it."
    ra, rb = score_responses(model, tokenizer, [prompt, prompt], [a, b], 96).tolist()
    margin = ra - rb
    assert abs(margin) > 1e-4

    # The pair three times as (a over b), once swapped: 3 of 4 right if r(a) > r(b).
    rows = [(a, b), (b, a), (a, b), (a, b)]
    data = tmp_path / "test.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": prompt, "chosen": c, "rejected": r}) + "\n" for c, r in rows)
    )
    out = tmp_path / "eval.json"
    code = cli(
        ["evaluate", "--reward", str(adapter), "--data", str(data)]
        + ["--base", str(tiny_base_dir), "--json", str(out)]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["comparisons"] == 4
    assert result["accuracy"] == pytest.approx(0.75 if margin > 0 else 0.25)
    assert result["mean_margin"] == pytest.approx(margin / 2, abs=1e-5)
    loss = (3 * math.log1p(math.exp(-margin)) + math.log1p(math.exp(margin))) / 4
    assert result["log_loss"] == pytest.approx(loss, abs=1e-5)


def test_evaluate_command_names_a_bad_row(tiny_base_dir, tmp_path, capsys):
    base, _ = load_base(str(tiny_base_dir))
    adapter = build_reward_model(base, ModelConfig()).save_pretrained(tmp_path / "ckpt")
    data = tmp_path / "test.jsonl"
    data.write_text('{"prompt": "p", "chosen": "x", "rejected": "y"}\n{"prompt": "p"}\n')
    code = cli(["evaluate", "--reward", str(adapter), "--data", str(data)])
    assert code == 2
    assert "test.jsonl:2" in capsys.readouterr().err
