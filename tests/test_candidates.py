"""Candidate responses for labeling: imported (checked), generated, ranked by a reward model."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from client.candidates import GenerationSettings, RewardScorer, generate_candidates, read_candidates
from client.importers import ImportFileError
from common.config import ModelConfig
from common.model import build_reward_model, encode_pairs, load_base, lora_config, score_pairs


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("{not json", ":1: bad JSON"),
        ('{"responses": ["a", "b"]}', ":1: field 'prompt'"),
        ('{"prompt": "p", "responses": ["a", ""]}', ":1: field 'responses'"),
        ('{"prompt": "p", "responses": ["same", "same"]}', ":1: field 'responses' needs two"),
    ],
)
def test_bad_candidate_files_name_the_line(tmp_path, line, error):
    path = tmp_path / "c.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ImportFileError, match=error):
        read_candidates(path)


def test_generation_samples_reference_and_policy(tiny_base_dir, tmp_path):
    base, _ = load_base(str(tiny_base_dir))
    policy = get_peft_model(base, lora_config(ModelConfig(), base))
    with torch.no_grad():  # a policy that differs from the reference
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    policy.save_pretrained(tmp_path / "policy")
    prompts = ["How do I cook pasta?", "Any advice on my budget?"]
    settings = GenerationSettings(per_model=2, max_new_tokens=12, seed=3)
    reference_only = generate_candidates(str(tiny_base_dir), None, prompts, settings)
    both = generate_candidates(str(tiny_base_dir), str(tmp_path / "policy"), prompts, settings)
    for prompt in prompts:
        assert 1 <= len(reference_only[prompt]) <= 2
        assert len(both[prompt]) > len(reference_only[prompt])  # the policy adds its own


def test_reward_scorer_loads_a_saved_adapter_and_scores_like_the_model(tiny_base_dir, tmp_path):
    base, tokenizer = load_base(str(tiny_base_dir))
    model = build_reward_model(base, ModelConfig(), seed=5)
    with torch.no_grad():
        model.head.weight.normal_(0, 1.0)
    adapter_dir = model.save_pretrained(tmp_path / "rm")
    scorer = RewardScorer(str(tiny_base_dir), adapter_dir, max_length=32)
    prompts, first, second = ["q?", "r?"], ["a good answer", "yes"], ["bad", "no thanks"]
    expected = score_pairs(model, encode_pairs(tokenizer, prompts, first, second, 32)).numpy()
    assert scorer(prompts, first, second) == pytest.approx(expected, abs=1e-5)


def test_generate_command_shows_reference_and_policy_side_by_side(tiny_base_dir, tmp_path, capsys):
    from fedrlhf.cli import main as cli

    base, _ = load_base(str(tiny_base_dir))
    policy = get_peft_model(base, lora_config(ModelConfig(), base))
    policy.save_pretrained(tmp_path / "policy")
    code = cli(
        ["generate", "--base", str(tiny_base_dir), "--policy", str(tmp_path / "policy")]
        + ["--prompt", "How do I cook pasta?", "--max-new-tokens", "6"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "reference" in out and "policy" in out and "How do I cook" in out
