"""Pretrain a small causal LM from scratch on a text corpus, and cache the result.

Used for the built-in bases: the simulation's tiny base (the synthetic world's text)
and the built-in English base (WordNet's glosses and examples). The result is saved
with ``save_pretrained``, so from then on it is loaded like any other base, by path.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import Progress
from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainSchedule:
    steps: int
    batch_size: int
    learning_rate: float
    max_tokens: int = 128
    """Longer texts (EOS appended) are cut to this many tokens; with ``pack``, the length
    of every training row."""
    seed: int = 0
    pack: bool = False
    """Concatenate the texts (EOS between them) and cut the stream into rows of
    ``max_tokens``, as GPT-style pretraining does: no step is spent on padding."""


def pretrain_causal_lm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    schedule: PretrainSchedule,
    description: str,
) -> None:
    """Next-token training on ``texts`` (AdamW, one-cycle schedule), in place."""
    model.train()
    ids, mask = _rows(tokenizer, texts, schedule)
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=schedule.learning_rate, weight_decay=0.01)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=schedule.learning_rate, total_steps=schedule.steps, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(schedule.seed)
    with Progress(transient=True) as progress:
        task = progress.add_task(description, total=schedule.steps)
        for step in range(schedule.steps):
            rows = torch.randint(0, ids.shape[0], (schedule.batch_size,), generator=generator)
            width = int(mask[rows].sum(1).max())
            out = model(
                input_ids=ids[rows, :width],
                attention_mask=mask[rows, :width],
                labels=labels[rows, :width],
            )
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_schedule.step()
            progress.update(
                task, advance=1, description=f"{description} (loss {out.loss.item():.3f})"
            )
            if step % 100 == 0 or step == schedule.steps - 1:
                log.info(
                    "%s: step %d/%d loss %.4f",
                    description,
                    step + 1,
                    schedule.steps,
                    out.loss.item(),
                )
    model.eval()


def _rows(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], schedule: PretrainSchedule
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training rows (ids, attention mask): one padded text per row, or packed."""
    texts = [t + tokenizer.eos_token for t in texts]
    if not schedule.pack:
        encoded = tokenizer(
            texts,
            add_special_tokens=False,
            padding=True,
            truncation=True,
            max_length=schedule.max_tokens,
            return_tensors="pt",
        )
        return encoded["input_ids"], encoded["attention_mask"]
    stream = [i for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in row]
    rows = len(stream) // schedule.max_tokens
    ids = torch.tensor(stream[: rows * schedule.max_tokens]).view(rows, schedule.max_tokens)
    return ids, torch.ones_like(ids)


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """One builder at a time across processes (simulated clients start together)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_build(target: Path, build: Callable[[Path], None]) -> Path:
    """``target`` if it holds a saved model, else ``build(tmp)`` and move it there.

    A crash mid-build leaves only a ``.partial`` folder, removed on the next try; two
    processes asking at once build it once.
    """
    if (target / "config.json").exists():
        return target
    with _exclusive(target.with_name(target.name + ".lock")):
        if (target / "config.json").exists():
            return target
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        tmp.rename(target)
    return target
