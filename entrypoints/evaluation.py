"""Evaluation: the eval loss, sample answers to held-out prompts, and how many of them match the reference."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any


def generate_answers(model: Any, tokenizer: Any, template: str | None, samples: list[dict[str, Any]],
                     max_new_tokens: int, seq2seq: bool = False) -> list[str]:
    """Greedy answers to the samples' prompts: rendered with the chat template, or (seq2seq) as the encoder's input."""
    import torch

    from entrypoints.templating import prompt_ids, seq2seq_prompt_ids

    if not samples or (template is None and not seq2seq):
        return []
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    prompts = [seq2seq_prompt_ids(tokenizer, s["messages"]) if seq2seq else prompt_ids(tokenizer, template, s["messages"])
               for s in samples]
    # All prompts in one padded batch: each decoding step dequantizes the 4-bit weights once for the whole batch
    # instead of once per prompt (on CPU that is most of the cost). A decoder continues its prompts, so they are
    # padded on the left and the answer is what follows them; an encoder-decoder's output is the answer alone.
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    padded = [(p + [pad] * (width - len(p)), [1] * len(p) + [0] * (width - len(p))) if seq2seq else
              ([pad] * (width - len(p)) + p, [0] * (width - len(p)) + [1] * len(p)) for p in prompts]
    ids = torch.tensor([row for row, _ in padded], device=device)
    mask = torch.tensor([row for _, row in padded], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             use_cache=True, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    answers = [tokenizer.decode(row if seq2seq else row[width:], skip_special_tokens=True).strip() for row in out]
    if was_training:
        model.train()
    return answers


def normalize_answer(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def answer_match(answers: Sequence[str], samples: Sequence[dict[str, Any]]) -> float | None:
    """Fraction of held-out answers that contain the reference answer as whole words (normalised case and
    punctuation: "1" is not found in "12", "Paris" is in "It is Paris."). Samples whose reference normalises to
    nothing (only punctuation or symbols) are left out; None when none is left (or nothing was answered)."""
    if not answers:
        return None
    scored = [(normalize_answer(a), normalize_answer(s["reference"])) for a, s in zip(answers, samples, strict=True)]
    scored = [(a, ref) for a, ref in scored if ref]
    if not scored:
        return None
    hits = [f" {ref} " in f" {a} " for a, ref in scored]
    return sum(hits) / len(hits)


def evaluate(trainer: Any, has_eval: bool) -> float | None:
    if not has_eval:
        return None
    loss = trainer.evaluate().get("eval_loss")
    return float(loss) if loss is not None and math.isfinite(loss) else None
