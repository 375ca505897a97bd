"""The policy for PPO and DPO: LoRA adapter ``policy`` + a value head, on the shared base.

One frozen copy of the base weights serves four roles, by switching PEFT adapters:

* policy: adapter ``policy`` active (generates, and is trained);
* reference: every adapter disabled (the base model itself);
* value: a linear head on the policy's final hidden states;
* reward: adapter ``reward`` active with its head (:class:`common.model.RewardModel`).

Only the policy adapter and the value head are trained, sent and checkpointed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from common.config import ModelConfig
from common.hardware import model_device
from common.model import active_adapter, keep_trainable, lora_config

POLICY_ADAPTER = "policy"
VALUE_HEAD_FILE = "value_head.safetensors"
POLICY_PREFIX = "policy."
"""Wire and checkpoint names of the policy adapter's tensors (``policy.<PEFT key>``)."""


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``log p(token_t | tokens_<t)`` for t = 1..T-1: shape ``[batch, T - 1]``."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return torch.gather(logp, 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def shrink_towards_reference(
    state: dict[str, torch.Tensor], factor: float
) -> dict[str, torch.Tensor]:
    """The policy whose every LoRA delta ``B @ A`` is ``factor`` times that of ``state``:
    the lora_B matrices scaled (the reference is B = 0). The value head is kept."""
    return {
        name: tensor * factor if name.startswith(POLICY_PREFIX) and "lora_B" in name else tensor
        for name, tensor in state.items()
    }


class PolicyModel(nn.Module):
    def __init__(self, lm: PeftModel, value_head: nn.Linear) -> None:
        super().__init__()
        self.lm = lm
        self.value_head = value_head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits ``[B, T, V]``, values ``[B, T]``) of the policy, on its device.

        ``position_ids`` are needed for left-padded prompts (rollouts).
        """
        input_ids, attention_mask, position_ids = self.placed(
            input_ids, attention_mask, position_ids
        )
        with active_adapter(self.lm, POLICY_ADAPTER):
            out = self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                output_hidden_states=True,
            )
        values = self.value_head(out.hidden_states[-1].float()).squeeze(-1)
        return out.logits, values

    @property
    def device(self) -> torch.device:
        return self.value_head.weight.device

    def placed(self, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """``tensors`` on the policy's device (None stays None)."""
        return tuple(t if t is None else t.to(self.device) for t in tensors)

    @torch.no_grad()
    def reference_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token log-probabilities under the base model (all adapters off)."""
        input_ids, attention_mask, position_ids = self.placed(
            input_ids, attention_mask, position_ids
        )
        with keep_trainable(self.lm), self.lm.disable_adapter():
            logits = self.lm(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
            ).logits
        return token_logprobs(logits, input_ids)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        reference: bool = False,
        **kwargs,  # noqa: ANN003
    ):  # noqa: ANN201
        """Sample from the policy, or from the ``reference`` (every adapter off);
        ``kwargs`` go to ``transformers`` ``generate``."""
        input_ids, attention_mask = self.placed(input_ids, attention_mask)
        if reference:
            with keep_trainable(self.lm), self.lm.disable_adapter():
                return self.lm.generate(
                    input_ids=input_ids, attention_mask=attention_mask, **kwargs
                )
        with active_adapter(self.lm, POLICY_ADAPTER):
            return self.lm.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        # Named apart from the reward model's ``adapter.*``: PEFT's keys omit the adapter
        # name, and a policy round carries both adapters.
        adapter = get_peft_model_state_dict(self.lm, adapter_name=POLICY_ADAPTER)
        state = {f"{POLICY_PREFIX}{k}": v for k, v in adapter.items()}
        state["value.weight"] = self.value_head.weight
        state["value.bias"] = self.value_head.bias
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        adapter = {
            k.removeprefix(POLICY_PREFIX): v
            for k, v in state.items()
            if k.startswith(POLICY_PREFIX)
        }
        result = set_peft_model_state_dict(self.lm, adapter, adapter_name=POLICY_ADAPTER)
        if result.unexpected_keys:
            raise ValueError(f"adapter tensors not in the model: {result.unexpected_keys}")
        with torch.no_grad():
            self.value_head.weight.copy_(state["value.weight"])
            self.value_head.bias.copy_(state["value.bias"])

    def save_pretrained(self, directory: str | Path) -> Path:
        """PEFT layout in ``<directory>/policy`` (``PeftModel.from_pretrained`` loads it)
        plus the value head; returns the adapter folder."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(str(directory), selected_adapters=[POLICY_ADAPTER])
        adapter_dir = directory / POLICY_ADAPTER
        save_file(
            {
                "weight": self.value_head.weight.detach().contiguous(),
                "bias": self.value_head.bias.detach(),
            },
            str(adapter_dir / VALUE_HEAD_FILE),
        )
        return adapter_dir


def add_policy(lm: PeftModel, config: ModelConfig, seed: int = 0) -> PolicyModel:
    """Add a fresh ``policy`` adapter and value head to a PEFT model (the reward model's).

    LoRA's B matrices start at zero, so the fresh policy equals the reference. A policy
    adapter already there (a process that served a run with another policy shape) is
    replaced.
    """
    if POLICY_ADAPTER in lm.peft_config:
        lm.delete_adapter(POLICY_ADAPTER)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        base = lm.get_base_model()
        lm.add_adapter(POLICY_ADAPTER, lora_config(config, base))
        value_head = nn.Linear(base.config.hidden_size, 1, device=model_device(base))
        nn.init.zeros_(value_head.weight)
        nn.init.zeros_(value_head.bias)
    lm.eval()
    return PolicyModel(lm, value_head)


def load_policy(lm: PeftModel, adapter_dir: str | Path) -> PolicyModel:
    """Load a saved policy adapter and value head onto a PEFT model."""
    adapter_dir = Path(adapter_dir)
    lm.load_adapter(str(adapter_dir), adapter_name=POLICY_ADAPTER)
    tensors = load_file(str(adapter_dir / VALUE_HEAD_FILE))
    base = lm.get_base_model()
    value_head = nn.Linear(base.config.hidden_size, 1, device=model_device(base))
    with torch.no_grad():
        value_head.weight.copy_(tensors["weight"])
        value_head.bias.copy_(tensors["bias"])
    lm.eval()
    return PolicyModel(lm, value_head)
