"""Candidate responses for the labeling queue: generated here, or imported.

Generation samples from the reference (the base model) and, when given, the global
policy adapter (PEFT layout, as the server checkpoints it), so annotators compare
what the federation's current policy writes against where it started. Scoring uses
the global reward adapter to rank pairs by how unsure it is.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel

from client.importers import ImportFileError
from common.chat_format import prompt_token_ids
from common.config import ModelConfig
from common.hardware import model_device
from common.model import encode_pairs, load_base, load_reward_model, score_pairs


@dataclass(frozen=True)
class GenerationSettings:
    per_model: int = 2
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0


def read_candidates(path: str | Path) -> list[tuple[str, list[str]]]:
    """JSONL lines ``{"prompt": str, "responses": [str, ...]}``; errors name file:line."""
    out = []
    try:
        lines = Path(path).read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ImportFileError(path, 0, f"not UTF-8 ({exc.reason})") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ImportFileError(path, number, f"bad JSON ({exc.msg})") from exc
        prompt = record.get("prompt") if isinstance(record, dict) else None
        responses = record.get("responses") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ImportFileError(path, number, "field 'prompt' must be a non-empty string")
        if not isinstance(responses, list) or not all(
            isinstance(r, str) and r.strip() for r in responses
        ):
            raise ImportFileError(path, number, "field 'responses' must be non-empty strings")
        if len(set(responses)) < 2:
            raise ImportFileError(path, number, "field 'responses' needs two different texts")
        out.append((prompt, list(dict.fromkeys(responses))))
    return out


@torch.no_grad()
def sample_responses(
    base: str,
    policy_dir: str | None,
    prompts: Sequence[str],
    settings: GenerationSettings,
    model_config: ModelConfig | None = None,
) -> dict[str, dict[str, list[str]]]:
    """``per_model`` samples per prompt from the reference and (if given) the policy:
    ``{"reference": {prompt: [...]}, "policy": {prompt: [...]}}``."""
    if policy_dir is not None and not (Path(policy_dir) / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"{policy_dir}: no adapter_config.json (expected a PEFT adapter directory)"
        )
    model, tokenizer = load_base(base, config=model_config)
    if policy_dir is not None:
        model = PeftModel.from_pretrained(model, policy_dir)
    model.eval()
    torch.manual_seed(settings.seed)
    kwargs = dict(
        do_sample=True,
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    device = model_device(model)
    out: dict[str, dict[str, list[str]]] = {}
    for variant in ["reference"] + (["policy"] if policy_dir else []):
        out[variant] = {}
        for prompt in prompts:
            row = prompt_token_ids(tokenizer, [prompt])[0]
            ids = torch.tensor([row] * settings.per_model, device=device)
            encoded = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if variant == "reference" and isinstance(model, PeftModel):
                with model.disable_adapter():
                    tokens = model.generate(**encoded, **kwargs)
            else:
                tokens = model.generate(**encoded, **kwargs)
            new = tokens[:, encoded["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            out[variant][prompt] = [t.strip() for t in texts]
    return out


def generate_candidates(
    base: str,
    policy_dir: str | None,
    prompts: Sequence[str],
    settings: GenerationSettings,
    model_config: ModelConfig | None = None,
) -> dict[str, list[str]]:
    """Distinct non-empty samples per prompt, from the reference and the policy."""
    samples = sample_responses(base, policy_dir, prompts, settings, model_config)
    out: dict[str, list[str]] = {p: [] for p in prompts}
    for by_prompt in samples.values():
        for prompt, texts in by_prompt.items():
            out[prompt] += [t for t in texts if t and t not in out[prompt]]
    return out


class RewardScorer:
    """Margins r(first) - r(second) from a saved reward adapter (``.../reward``)."""

    def __init__(
        self,
        base: str,
        reward_dir: str | Path,
        max_length: int = 128,
        model_config: ModelConfig | None = None,
    ) -> None:
        model, self.tokenizer = load_base(base, config=model_config)
        self.model = load_reward_model(model, reward_dir)
        self.max_length = max_length

    def __call__(
        self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]
    ) -> np.ndarray:
        pairs = encode_pairs(self.tokenizer, prompts, first, second, self.max_length)
        return score_pairs(self.model, pairs).numpy()
