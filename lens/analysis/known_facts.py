"""Which facts a model knows: its greedy next token after the prompt is the first token of the true object.

Tracing or editing a fact the model does not know measures nothing, so fact experiments start from
this filter. Prompts are batched only with prompts of the same token length: nothing is padded, so
the answer for a prompt cannot depend on which other prompts share its batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lens.config import InputError
from lens.data.batches import equal_length_batches
from lens.data.facts import Fact


def first_token(tokenizer: PreTrainedTokenizerBase, target: str) -> int:
    """The token an object starts with when it continues a prompt (``" Paris"`` -> the id of ``" Paris"``)."""
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"target {target!r} encodes to no tokens: give a non-empty object")
    return ids[0]


@torch.no_grad()
def greedy_next_tokens(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], batch_size: int = 16
) -> list[int]:
    """The greedy next token after each prompt (encoded as the tokenizer does by default, so with BOS
    where the model expects one), in batches of equal-length prompts: no padding, no attention mask."""
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    encoded = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    for prompt, ids in zip(prompts, encoded):
        if not ids:
            raise InputError(f"prompt {prompt!r} encodes to no tokens: give a non-empty prompt")
    batches = equal_length_batches([len(ids) for ids in encoded], batch_size)
    greedy = [0] * len(prompts)
    for batch in tqdm(batches, desc="greedy next tokens", disable=len(batches) < 4):
        ids = torch.tensor([encoded[i] for i in batch], device=model.device)  # [B, T], all the same length
        logits = model(input_ids=ids, use_cache=False).logits[:, -1]  # [B, V]
        for index, token in zip(batch, logits.argmax(dim=-1).tolist()):
            greedy[index] = token
    return greedy


def known_facts(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact], batch_size: int = 16
) -> list[Fact]:
    """The facts (in their order) whose greedy next token after ``text()`` is the first token of ``target_true``."""
    greedy = greedy_next_tokens(model, tokenizer, [fact.text() for fact in facts], batch_size)
    return [fact for fact, token in zip(facts, greedy) if token == first_token(tokenizer, fact.target_true)]
