"""The shared base model, its tokenizer, and the LoRA reward model on top of it.

One frozen copy of a Hugging Face causal LM serves every role: the reward model is
the LoRA adapter ``reward`` plus a scalar head on the last token's hidden state.
Only the adapter and the head are trained, sent and checkpointed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.pytorch_utils import Conv1D

from common.chat_format import cut_prompt, prompt_token_ids, response_token_ids
from common.config import ModelConfig
from common.hardware import model_device, resolve_device, resolve_dtype

BUILTIN_TINY = "builtin:tiny"
PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
REWARD_ADAPTER = "reward"
REWARD_HEAD_FILE = "reward_head.safetensors"


@dataclass(frozen=True)
class LlamaShape:
    """The size of a small Llama-style base built from scratch."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int = 256


TINY_SHAPE = LlamaShape(hidden=64, layers=2, heads=4, intermediate=128)
"""The built-in tiny base: big enough to learn a small grammar, small enough that a
federated DP run over several organizations takes minutes on two cores."""


def build_byte_level_tokenizer(
    corpus: Iterable[str] = (), vocab_size: int = 259, lowercase: bool = False
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer: every UTF-8 text maps to tokens, nothing is <unk>.

    With no corpus it is pure bytes (256 symbols plus specials); with a corpus, BPE
    merges learned from it shorten frequent words to single tokens. ``lowercase``
    (like BERT's uncased models) spends no vocabulary on capitalized variants, which a
    small vocabulary learned from a small corpus cannot afford.
    """
    tokenizer = Tokenizer(models.BPE())
    if lowercase:
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN
    )


def build_tiny_base(
    tokenizer: PreTrainedTokenizerBase, seed: int = 0, shape: LlamaShape = TINY_SHAPE
) -> LlamaForCausalLM:
    """A small Llama-style causal LM of ``shape`` (random weights, fixed by ``seed``)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=shape.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def load_base(
    spec: str, seed: int = 0, config: ModelConfig | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the frozen base model and its tokenizer.

    ``spec`` is a local directory or hub id (``from_pretrained``), ``builtin:tiny`` (random
    weights, for tests) or ``builtin:english`` (:mod:`common.english_base`, pretrained on
    this machine the first time). ``config`` gives device, dtype and the loading options
    (:mod:`common.hardware`); without it the base loads on the CPU in float32, as tools
    that score a checkpoint want.
    """
    device = resolve_device(config.device) if config else torch.device("cpu")
    dtype = resolve_dtype(config.dtype, device) if config else torch.float32
    if spec == BUILTIN_TINY:
        tokenizer = build_byte_level_tokenizer()
        model = build_tiny_base(tokenizer, seed)
    else:
        spec = resolve_base(spec)
        remote = bool(config and config.trust_remote_code)
        options = {}
        if config and config.attn_implementation != "default":
            options["attn_implementation"] = config.attn_implementation
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=remote)
        model = AutoModelForCausalLM.from_pretrained(
            spec, dtype=dtype, trust_remote_code=remote, **options
        )
    prepare_tokenizer(tokenizer, spec)
    model.to(device=device, dtype=dtype)
    if config and config.gradient_checkpointing:
        # Non-reentrant: the frozen base's inputs need no grad for the LoRA grads to flow.
        options = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # Transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    disable_dropout(model)
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer


def disable_dropout(model: nn.Module) -> None:
    """Zero the frozen base's dropout (GPT-2 ships 0.1), as TRL's trainers do: training
    mode is on while adapters train, and base dropout would make the fresh policy differ
    from the reference and each comparison's gradient depend on a dropout draw. LoRA's
    own dropout (``model.lora-dropout``) is added later and is not touched."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Right padding, and a pad token where the tokenizer has none (Llama, GPT-2): the
    EOS token, as TRL does; padded positions are masked out everywhere."""
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"{where}: the tokenizer has no EOS token; fedrlhf reads the reward at the "
            "end of a response and stops generation there"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"


def resolve_base(spec: str) -> str:
    """``builtin:english`` as the directory of the cached English base (built first if
    this machine has none); any other spec unchanged."""
    from common.english_base import ENGLISH_BASE, english_base_dir

    return str(english_base_dir()) if spec == ENGLISH_BASE else spec


def lora_config(config: ModelConfig, base: PreTrainedModel) -> LoraConfig:
    """The LoRA shape of ``config`` for ``base``: ``auto`` targets are PEFT's defaults for
    its architecture; named targets must exist in it (else an error lists what does)."""
    targets = config.lora_targets
    target_modules: str | list[str]
    if targets == "auto":
        model_type = base.config.model_type
        if model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
            raise ValueError(
                f"model.lora-targets 'auto' knows no default for {model_type!r} models; "
                f"name the modules, e.g. one of: {', '.join(linear_module_names(base))}"
            )
        target_modules = list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    elif targets == "all-linear":
        target_modules = targets
    else:
        target_modules = [t.strip() for t in targets.split(",") if t.strip()]
        present = set(linear_module_names(base))
        missing = [t for t in target_modules if t not in present]
        if missing:
            raise ValueError(
                f"model.lora-targets names {', '.join(missing)}, which this "
                f"{base.config.model_type} model does not have; its linear modules are: "
                f"{', '.join(sorted(present))}"
            )
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target_modules,
        bias="none",
    )


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last names of a model's linear layers (``q_proj``, ``c_attn``, ...),
    the names LoRA targets go by; the LM head is left out, as PEFT's ``all-linear`` does."""
    names = set()
    for name, module in model.named_modules():
        if ".lora_" in name or not isinstance(module, (nn.Linear, Conv1D)):
            continue  # an adapter's own layers are not targets
        name = name.removesuffix(".base_layer")  # a layer that already carries an adapter
        if not name.endswith("lm_head"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


@contextmanager
def keep_trainable(module: nn.Module) -> Iterator[None]:
    """Restore every parameter's ``requires_grad`` on exit.

    PEFT's adapter switches (``set_adapter``, ``disable_adapter``) also change which
    adapter is trainable; which tensors train is the trainer's decision, not theirs.
    """
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def train_only(
    model: nn.Module, adapter: str, heads: tuple[str, ...] = (), freeze_lora_a: bool = False
) -> None:
    """Make exactly one adapter's LoRA tensors and the named heads trainable.

    The base is shared by the reward and policy adapters; a process that served one
    phase must not carry that phase's trainable tensors into the other (Opacus would
    expect per-sample gradients for them). ``freeze_lora_a`` trains the adapter's B
    matrices only (FFA-LoRA, Sun et al. 2024): at B = 0 the A matrices get no gradient
    at all, so under DP-SGD they would take noise alone.
    """
    for name, p in model.named_parameters():
        lora = f".{adapter}." in name and not (freeze_lora_a and ".lora_A." in name)
        p.requires_grad_(lora or name.startswith(heads))


@contextmanager
def active_adapter(lm: PeftModel, name: str) -> Iterator[None]:
    """Run with adapter ``name`` active (the base is shared by several), then restore."""
    previous = lm.active_adapter
    if previous == name:
        yield
        return
    with keep_trainable(lm):
        lm.set_adapter(name)
    try:
        yield
    finally:
        with keep_trainable(lm):
            lm.set_adapter(previous)


class RewardModel(nn.Module):
    """Scalar reward r(prompt, response): LoRA adapter ``reward`` + linear head.

    The head reads the final hidden states either averaged over the real tokens
    (``mean``: robust for small models and little data) or at the last real token
    (``last``: what Hugging Face's sequence classifiers do). Inputs are right-padded.
    """

    def __init__(self, lm: PeftModel, head: nn.Linear, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        self.lm = lm
        self.head = head
        self.pooling = pooling

    @property
    def backbone(self) -> nn.Module:
        # The decoder stack without the LM head; LoRA layers are injected in place.
        return self.lm.get_base_model().base_model

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        with active_adapter(self.lm, REWARD_ADAPTER):
            hidden = self.backbone(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
        hidden = hidden.float()  # the head, its gradients and the score stay float32
        if self.pooling == "mean":
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
        else:
            last = attention_mask.sum(dim=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(pooled).squeeze(-1)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Adapter and head tensors, by stable names (PEFT's names for the adapter)."""
        adapter = get_peft_model_state_dict(self.lm, adapter_name=REWARD_ADAPTER)
        state = {f"adapter.{k}": v for k, v in adapter.items()}
        state["head.weight"] = self.head.weight
        state["head.bias"] = self.head.bias
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy adapter and head tensors in; names and shapes must already be checked."""
        adapter = {
            k.removeprefix("adapter."): v for k, v in state.items() if k.startswith("adapter.")
        }
        result = set_peft_model_state_dict(self.lm, adapter, adapter_name=REWARD_ADAPTER)
        if result.unexpected_keys:
            raise ValueError(f"adapter tensors not in the model: {result.unexpected_keys}")
        with torch.no_grad():
            self.head.weight.copy_(state["head.weight"])
            self.head.bias.copy_(state["head.bias"])

    def save_pretrained(self, directory: str | Path) -> Path:
        """PEFT layout (``adapter_config.json`` + ``adapter_model.safetensors``) + head.

        Returns the adapter folder, loadable with ``PeftModel.from_pretrained``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(str(directory), selected_adapters=[REWARD_ADAPTER])
        # PEFT puts a non-default adapter in a sub-folder named after it.
        adapter_dir = directory / REWARD_ADAPTER
        save_file(
            {"weight": self.head.weight.detach().contiguous(), "bias": self.head.bias.detach()},
            str(adapter_dir / REWARD_HEAD_FILE),
            metadata={"pooling": self.pooling},
        )
        return adapter_dir


def build_reward_model(base: PreTrainedModel, config: ModelConfig, seed: int = 0) -> RewardModel:
    """Put a fresh ``reward`` LoRA adapter and scalar head on ``base`` (in place)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        lm = get_peft_model(base, lora_config(config, base), adapter_name=REWARD_ADAPTER)
        head = nn.Linear(base.config.hidden_size, 1, device=model_device(base))
    lm.eval()  # no dropout in the frozen base; LoRA dropout is a config setting
    return RewardModel(lm, head, config.reward_pooling)


def load_reward_model(base: PreTrainedModel, adapter_dir: str | Path) -> RewardModel:
    """Load a saved reward adapter (``PeftModel.from_pretrained``) and its head."""
    adapter_dir = Path(adapter_dir)
    lm = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=REWARD_ADAPTER)
    head_file = str(adapter_dir / REWARD_HEAD_FILE)
    tensors = load_file(head_file)
    with safe_open(head_file, "pt") as handle:
        pooling = (handle.metadata() or {}).get("pooling", "last")
    head = nn.Linear(base.config.hidden_size, 1, device=model_device(base))
    with torch.no_grad():
        head.weight.copy_(tensors["weight"])
        head.bias.copy_(tensors["bias"])
    lm.eval()
    return RewardModel(lm, head, pooling)


@dataclass(frozen=True)
class EncodedPairs:
    """Tokenized comparisons: chosen and rejected texts, right-padded."""

    chosen_ids: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_ids: torch.Tensor
    rejected_mask: torch.Tensor

    def __len__(self) -> int:
        return self.chosen_ids.shape[0]


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize prompt and response (:mod:`common.chat_format`: the chat template's
    assistant turn, or ``prompt + "\\n" + response``), then EOS, right-padded.

    Too long: the prompt is cut from the left (its BOS kept), then the response from
    the right; the EOS token (where the score is read) is always kept.
    """
    ids, mask, _ = encode_texts_with_starts(tokenizer, prompts, responses, max_length)
    return ids, mask


def encode_texts_with_starts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`encode_texts` plus the index of each row's first response token."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        empty = torch.zeros((0, 1), dtype=torch.long)
        return empty, empty.clone(), torch.zeros(0, dtype=torch.long)
    prompt_rows = prompt_token_ids(tokenizer, list(prompts))
    response_rows = response_token_ids(tokenizer, list(responses), max_length)
    rows: list[list[int]] = []
    starts: list[int] = []
    for prompt_ids, response_ids in zip(prompt_rows, response_rows, strict=True):
        kept_prompt = cut_prompt(prompt_ids, max_length - len(response_ids), tokenizer.bos_token_id)
        rows.append(kept_prompt + response_ids)
        starts.append(len(kept_prompt))
    width = max((len(r) for r in rows), default=1)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask, torch.tensor(starts, dtype=torch.long)


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    chosen: list[str],
    rejected: list[str],
    max_length: int,
) -> EncodedPairs:
    chosen_ids, chosen_mask = encode_texts(tokenizer, prompts, chosen, max_length)
    rejected_ids, rejected_mask = encode_texts(tokenizer, prompts, rejected, max_length)
    return EncodedPairs(chosen_ids, chosen_mask, rejected_ids, rejected_mask)


@torch.no_grad()
def score_pairs(model: RewardModel, pairs: EncodedPairs, batch_size: int = 256) -> torch.Tensor:
    """r(chosen) - r(rejected) for every pair, in evaluation mode."""
    margins = []
    for start in range(0, len(pairs), batch_size):
        end = start + batch_size
        chosen = model(pairs.chosen_ids[start:end], pairs.chosen_mask[start:end])
        rejected = model(pairs.rejected_ids[start:end], pairs.rejected_mask[start:end])
        margins.append((chosen - rejected).cpu())
    return torch.cat(margins) if margins else torch.zeros(0)


@torch.no_grad()
def score_responses(
    model: RewardModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    max_length: int,
    batch_size: int = 256,
) -> torch.Tensor:
    """The reward model's score r(prompt, response) for each response."""
    scores = []
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        ids, mask = encode_texts(tokenizer, prompts[start:end], responses[start:end], max_length)
        scores.append(model(ids, mask).cpu())
    return torch.cat(scores) if scores else torch.zeros(0)
