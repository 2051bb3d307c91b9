"""Evaluation: the eval loss, answers to held-out prompts and to the eval suites, and how they score against their
references (exact match, contains, token F1, ROUGE-L).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from entrypoints.config import env_name
from entrypoints.errors import ConfigError
from entrypoints.suites import METRICS, Suite

log = logging.getLogger("qlora.evaluation")
# A progress line at most this often while answers are generated (a 500-question suite takes minutes on a GPU and
# much longer on CPU); a batch that ends sooner than this after the previous line prints nothing.
PROGRESS_SECONDS = 30.0
# generation_batch_size=0 (auto): on a GPU as many prompts as half its free memory holds (KV cache, the prefill's
# activations, the logits), at most this many; on CPU, where a larger batch buys little, CPU_GENERATION_BATCH.
MAX_AUTO_GENERATION_BATCH = 128
CPU_GENERATION_BATCH = 16


def generate_answers(model: Any, tokenizer: Any, template: str | None, samples: Sequence[Any],
                     max_new_tokens: int, batch_size: int = 0, seq2seq: bool = False, what: str = "") -> list[str]:
    """Greedy answers to `samples` (dicts or SuiteItems with `messages`, or a plain `prompt` when there is no chat
    template), in batches of `batch_size` prompts (0: as many as fit, `auto_generation_batch`); a batch that runs out
    of GPU memory is split in two and retried. `seq2seq`: an encoder-decoder model, whose
    prompts are the encoder's plain-text input (templating.seq2seq_input). `what` names the questions in the
    progress lines logged every PROGRESS_SECONDS."""
    from entrypoints.templating import prompt_ids, seq2seq_prompt_ids

    if not samples:
        return []
    prompts = []
    for s in samples:
        messages, prompt = (s.get("messages"), s.get("prompt")) if isinstance(s, dict) else (s.messages, s.prompt)
        if seq2seq:
            prompts.append(seq2seq_prompt_ids(tokenizer, messages if messages is not None else
                                              [{"role": "user", "content": prompt}]))
        elif template is not None and messages is not None:
            prompts.append(prompt_ids(tokenizer, template, messages))
        elif template is None and messages is None:
            prompts.append(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        else:
            return []  # the held-out samples of plain-text data: nothing to ask
    # Longest first, so that each batch holds prompts of similar lengths (less padding) and a batch too large for the
    # memory fails at once; the answers are returned in the samples' order.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    size = batch_size or auto_generation_batch(model, len(prompts[order[0]]), max_new_tokens)
    sharded = _fsdp_generation(model)
    if sharded:
        # Every rank takes part in every forward pass of a sharded model (its weights are gathered layer by layer):
        # the ranks must make the same generate calls in the same order. Each rank's automatic size follows its own
        # free memory, so they agree on the smallest.
        size = agreed_batch_size(size)
    answers: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    started = last = time.monotonic()
    done = 0
    try:
        while done < len(order):
            chunk = order[done:done + size]
            try:
                batch = _generate(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens, seq2seq, sharded)
            except Exception as exc:  # noqa: BLE001 - only a GPU out-of-memory error is retried, anything else raises
                if not _out_of_memory(exc) or size == 1:
                    raise
                if sharded:
                    # The other ranks are inside this batch's collectives: a retry of this rank alone would pair its
                    # weight gathers with theirs for other layers (equal shapes, so no error: wrong answers).
                    raise ConfigError([f"answering {what or 'prompts'}: {len(chunk)} prompts at once ran out of GPU"
                                       " memory on this rank of a sharded (FSDP) run, where the ranks cannot retry"
                                       f" apart: set {env_name('generation_batch_size')}={max(1, len(chunk) // 2)} (or"
                                       " lower)"]) from None
                size = max(1, len(chunk) // 2)
                log.warning("answering %s: %d prompts at once ran out of GPU memory; going on with %d",
                            what or "prompts", len(chunk), size)
                _free_cuda_cache()
                continue
            for i, answer in zip(chunk, batch, strict=True):
                answers[i] = answer
            done += len(chunk)
            now = time.monotonic()
            if what and done < len(order) and now - last >= PROGRESS_SECONDS:
                last = now
                log.info("answering %s: %d/%d in %.0f s", what, done, len(order), now - started)
    finally:
        if was_training:
            model.train()
    return answers


def agreed_batch_size(size: int) -> int:
    """The smallest of the ranks' batch sizes (every rank calls this, in step); `size` without a process group."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return size
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    agreed = torch.tensor([size], dtype=torch.int64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return int(agreed.item())


def auto_generation_batch(model: Any, prompt_tokens: int, max_new_tokens: int) -> int:
    """Prompts answered at once when generation_batch_size is 0: on a GPU, as many as half of the memory left to this
    process holds (each row: its KV cache over prompt + answer, the prefill's activations over the prompt, the
    float32 logits), between 1 and MAX_AUTO_GENERATION_BATCH; on CPU, CPU_GENERATION_BATCH. Batches of the longest
    prompts come first, so a size that fits the first batch fits every other."""
    import torch

    device = next(p.device for p in model.parameters())
    if device.type != "cuda":
        return CPU_GENERATION_BATCH
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def dim(*names: str, default: int = 0) -> int:
        return next((int(v) for n in names if isinstance(v := getattr(text, n, None), int) and v > 0), default)

    hidden = dim("hidden_size", "d_model", default=4096)
    heads = dim("num_attention_heads", "num_heads", default=32)
    kv_heads = dim("num_key_value_heads", default=heads)
    head_dim = dim("head_dim", "d_kv", default=hidden // heads)
    layers = dim("num_hidden_layers", "num_decoder_layers", "num_layers", default=32)
    vocab = dim("vocab_size", default=32000)
    intermediate = dim("intermediate_size", "d_ff", default=4 * hidden)
    element = 2  # bf16/fp16 compute
    row = (2 * layers * kv_heads * head_dim * element * (prompt_tokens + max_new_tokens)
           + prompt_tokens * (3 * intermediate + 4 * hidden) * element + 2 * vocab * 4)
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    allocated, reserved = torch.cuda.memory_allocated(index), torch.cuda.memory_reserved(index)
    left = free + (reserved - allocated)  # the caching allocator's idle blocks are this process's too
    fraction = torch.cuda.get_per_process_memory_fraction(index) if hasattr(
        torch.cuda, "get_per_process_memory_fraction") else 1.0
    left = min(left, int(fraction * total) - allocated)  # the job's own cap (max_gpu_memory_gib)
    return max(1, min(MAX_AUTO_GENERATION_BATCH, int(left * 0.5) // max(row, 1)))


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _free_cuda_cache() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _generate(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, seq2seq: bool,
              sharded: bool) -> list[str]:
    """`sharded`: an FSDP model (_fsdp_generation), decoded in step with the other ranks (`synced_gpus`)."""
    import torch

    device = next(p.device for p in model.parameters())
    # One padded batch: each decoding step dequantizes the 4-bit weights once for the whole batch instead of once per
    # prompt (on CPU that is most of the cost). A decoder continues its prompts, so they are padded on the left and
    # the answer is what follows them; an encoder-decoder's prompts are padded on the right, its output is the answer.
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    padded = [(p + [pad] * (width - len(p)), [1] * len(p) + [0] * (width - len(p))) if seq2seq else
              ([pad] * (width - len(p)) + p, [0] * (width - len(p)) + [1] * len(p)) for p in prompts]
    ids = torch.tensor([row for row, _ in padded], device=device)
    mask = torch.tensor([row for _, row in padded], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             use_cache=True, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                             **({"synced_gpus": True} if sharded else {}))
    return [tokenizer.decode(row if seq2seq else row[width:], skip_special_tokens=True).strip() for row in out]


def _fsdp_generation(model: Any) -> bool:
    """Whether `model` is sharded by FSDP2; if so, its `generate` gathers the weights like a forward pass (torch's
    register_fsdp_forward_method, once), and the caller decodes in step with the other ranks (`synced_gpus`)."""
    try:
        from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
    except ImportError:
        return False
    if not isinstance(model, FSDPModule):
        return False
    if not getattr(model, "_qlora_generate_registered", False):
        register_fsdp_forward_method(model, "generate")
        model._qlora_generate_registered = True
    return True


@contextlib.contextmanager
def base_model(model: Any) -> Iterator[None]:
    """The base model's answers: the LoRA adapter switched off (peft) for the duration."""
    disable = getattr(model, "disable_adapter", None)
    with disable() if disable is not None else contextlib.nullcontext():
        yield


def answer_suites(model: Any, tokenizer: Any, template: str | None, suites: Sequence[Suite], max_new_tokens: int,
                  batch_size: int, seq2seq: bool = False, when: str = ""
                  ) -> tuple[dict[str, list[str]], dict[str, float]]:
    """Every suite's answers and the seconds they took, by suite name. `when` ("before", "after") is for the logs."""
    answers, seconds = {}, {}
    for s in suites:
        started = time.monotonic()
        what = f"eval suite {s.name}" + (f" ({when} training)" if when else "")
        answers[s.name] = generate_answers(model, tokenizer, template, s.items, max_new_tokens, batch_size, seq2seq,
                                           what=what)
        seconds[s.name] = round(time.monotonic() - started, 2)
        log.info("%s: %d answers in %.1f s", what, len(s.items), seconds[s.name])
    return answers, seconds


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


# ------------------------------------------------------------------------------------------- suite metrics
def _words(text: str) -> list[str]:
    """The words an answer is scored on: lower case, punctuation removed (any script: `\\w` is Unicode-aware); a text
    of punctuation or symbols only is scored on its whitespace-separated pieces instead of on nothing."""
    return normalize_answer(text).split() or text.lower().split()


def check_scorers() -> None:
    """Fail before any training when a metric's library is missing (an image built without the `train` extra)."""
    from entrypoints.errors import ConfigError

    try:
        import rapidfuzz.distance  # noqa: F401
    except ImportError:
        raise ConfigError(["QLORA_EVAL_SUITE is set, and ROUGE-L needs the rapidfuzz package, which is not"
                           " installed: install the job with its `train` extra (pip install -e '.[train]' in the"
                           " checkout), or unset QLORA_EVAL_SUITE"]) from None


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F-measure: the longest common subsequence of the two texts' words (computed by rapidfuzz's LCSseq over
    the same Unicode-aware words as the other metrics), as precision over the answer and recall over the reference.
    rapidfuzz rather than rouge-score: the latter is published only as a source archive, which the image's
    wheels-only lock cannot install, and its default tokenizer drops every non-ASCII character."""
    from rapidfuzz.distance import LCSseq

    got, want = _words(answer), _words(reference)
    if not got or not want:
        return 0.0
    common = LCSseq.similarity(got, want)
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def token_f1(answer: str, reference: str) -> float:
    """F1 of the words answer and reference share (counted with multiplicity, in any order)."""
    a, r = _words(answer), _words(reference)
    common = sum((Counter(a) & Counter(r)).values())
    if not a or not r or not common:
        return float(a == r)
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def contains(answer: str, reference: str) -> float:
    """1.0 when the reference's words appear in the answer, together and in order, as whole words."""
    a, r = _words(answer), _words(reference)
    return float(any(a[i:i + len(r)] == r for i in range(len(a) - len(r) + 1)))


def exact_match(answer: str, reference: str) -> float:
    return float(_words(answer) == _words(reference))


SCORERS = {"exact_match": exact_match, "contains": contains, "token_f1": token_f1, "rouge_l": rouge_l}
assert tuple(SCORERS) == METRICS


def score_answer(answer: str, reference: str) -> dict[str, float]:
    return {name: round(fn(answer, reference), 6) for name, fn in SCORERS.items()}


def summarize_scores(scores: Sequence[dict[str, float]], primary: Sequence[str]) -> dict[str, float | int]:
    """The mean of each metric over the items, `score` (the mean of each item's own metric) and the count."""
    n = len(scores)
    out: dict[str, float | int] = {m: round(sum(s[m] for s in scores) / n, 6) if n else 0.0 for m in METRICS}
    out["score"] = round(sum(s[m] for s, m in zip(scores, primary, strict=True)) / n, 6) if n else 0.0
    out["count"] = n
    return out


def suite_report(suite: Suite, before: Sequence[str], after: Sequence[str], max_new_tokens: int,
                 answer_seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """One suite's results: where it came from, the summary before and after training, the seconds its answers took
    (`{"before": s, "after": s}`), and every item's answers."""
    primary = [item.metric for item in suite.items]
    scored_before = [score_answer(a, item.reference) for a, item in zip(before, suite.items, strict=True)]
    scored_after = [score_answer(a, item.reference) for a, item in zip(after, suite.items, strict=True)]
    items = [{"source": item.source, "prompt": item.prompt, "reference": item.reference, "metric": item.metric,
              "before": b, "after": a, "scores_before": sb, "scores_after": sa}
             for item, b, a, sb, sa in zip(suite.items, before, after, scored_before, scored_after, strict=True)]
    return {"name": suite.name, "uri": suite.uri, "sha256": suite.sha256, "count": len(items),
            "max_new_tokens": max_new_tokens, "answer_seconds": dict(answer_seconds or {}),
            "before": summarize_scores(scored_before, primary),
            "after": summarize_scores(scored_after, primary), "items": items}

