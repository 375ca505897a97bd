import pytest
import torch
from peft import PeftModel

from common.config import ModelConfig
from common.model import (
    build_byte_level_tokenizer,
    build_reward_model,
    encode_pairs,
    encode_texts,
    load_base,
    load_reward_model,
    score_pairs,
)

TEXTS = [
    "plain ascii",
    "Grüße, naïve café",
    "日本語のテキスト",
    "emoji 🎉🚀",
    "tab\tand\nnewline",
    "\u200b zero width",
]


@pytest.mark.parametrize("corpus", [(), ("How do I cook pasta?",) * 5])
def test_byte_level_tokenizer_round_trips_any_utf8(corpus):
    tokenizer = build_byte_level_tokenizer(corpus, vocab_size=280)
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text


def test_base_loads_from_a_local_path_frozen(tiny_base_dir):
    model, tokenizer = load_base(str(tiny_base_dir))
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"


def test_builtin_tiny_is_deterministic():
    a, _ = load_base("builtin:tiny", seed=3)
    b, _ = load_base("builtin:tiny", seed=3)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_only_adapter_and_head_are_trainable(tiny_base_dir):
    base, _ = load_base(str(tiny_base_dir))
    model = build_reward_model(base, ModelConfig())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    state = model.trainable_state()
    assert all(
        n.startswith("adapter.") and ".lora_" in n
        for n in state
        if n not in ("head.weight", "head.bias")
    )
    assert sum(t.numel() for t in state.values()) == sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad
    )


def test_encode_keeps_eos_and_cuts_long_prompts_from_the_left(tiny_base_dir):
    _, tokenizer = load_base(str(tiny_base_dir))
    ids, mask = encode_texts(tokenizer, ["x " * 200], ["the answer"], max_length=16)
    assert ids.shape == (1, 16) and mask.sum() == 16
    assert ids[0, -1].item() == tokenizer.eos_token_id
    assert tokenizer.decode(ids[0, :-1]).endswith("the answer")


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_saved_adapter_loads_with_peft_and_scores_the_same(tiny_base_dir, tmp_path, pooling):
    base, tokenizer = load_base(str(tiny_base_dir))
    model = build_reward_model(base, ModelConfig(reward_pooling=pooling), seed=1)
    with torch.no_grad():
        for tensor in model.trainable_state().values():
            tensor.add_(torch.randn_like(tensor) * 0.1)  # LoRA B starts at 0: make it matter
    pairs = encode_pairs(tokenizer, ["p1", "p2"], ["good answer", "yes"], ["bad", "no no"], 32)
    expected = score_pairs(model, pairs)
    adapter_dir = model.save_pretrained(tmp_path / "ckpt")
    assert (adapter_dir / "adapter_config.json").exists()
    assert (adapter_dir / "adapter_model.safetensors").exists()

    fresh, _ = load_base(str(tiny_base_dir))
    plain = PeftModel.from_pretrained(fresh, str(adapter_dir))  # the standard PEFT call works
    assert any("lora_A" in n for n, _ in plain.named_parameters())

    fresh, _ = load_base(str(tiny_base_dir))
    loaded = load_reward_model(fresh, adapter_dir)
    assert loaded.pooling == pooling
    torch.testing.assert_close(score_pairs(loaded, pairs), expected)
