"""One rank of tests/integration/test_fsdp_sharded.py, started by torchrun with gloo on CPU: a model sharded by
FSDP2 (torch's fully_shard over every decoder layer and the whole model, as the job's FSDP plan wraps it).

    python -m torch.distributed.run --standalone --nproc-per-node=2 -m tests.fsdp_proc MODEL_DIR MODE OUT

Each rank writes OUT/rank-<rank>.json.
- `answer`: the tiny model answers prompts through the job's evaluation.generate_answers with the automatic batch
  size, which differs between the ranks here (3 prompts on rank 0, 2 on rank 1: free GPU memory is never the same on
  two GPUs): the answers and the batch sizes generate saw.
- `oom`: the same, every generate call running out of GPU memory (as on ranks with equal memory): the error's exit
  code and message.
- `prequantized`: MODEL_DIR is a bitsandbytes 4-bit checkpoint, loaded by the job's own modeling.load_model (stored
  form, packed weights kept in the compute dtype), with LoRA on every linear layer; one forward and backward pass and
  greedy answers before sharding, then the same after: the loss, the LoRA gradients (averaged over the ranks, which
  see the same batch) and the answers, and the sizes of a 4-bit weight before and on this rank after.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def prequantized(model_dir: str, rank: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard

    from entrypoints import evaluation
    from entrypoints.config import parse_config
    from entrypoints.modeling import load_model, load_tokenizer, settings_for_checkpoint
    from entrypoints.suites import SuiteItem

    path = Path(model_dir)
    cfg = settings_for_checkpoint(parse_config({}, ["--model", model_dir, "--data", "x.jsonl", "--base-dir",
                                                    str(path.parent / f"base-{rank}")], check_paths=False), path)
    tok = load_tokenizer(path, cfg)
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token
    torch.manual_seed(0)  # the same LoRA initialisation on both ranks
    model = get_peft_model(load_model(path, cfg), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                             lora_dropout=0.0))
    for name, param in model.named_parameters():  # B starts at zero: give A a gradient too
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    batch = tok(["The capital of Veloria is Quendar.", "Ossel is the river of Quendar."], return_tensors="pt",
                padding=True)
    items = [SuiteItem(f"s.jsonl:{i}", None, f"Question number {i}?", "yes", "contains") for i in range(3)]

    def step() -> tuple[float, dict]:
        model.zero_grad()
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float().tolist()
                 for n, p in model.named_parameters() if p.requires_grad}
        return float(loss), grads

    def weight():
        return model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight

    before_loss, before_grads = step()
    before_answers = evaluation.generate_answers(model, tok, None, items, 4, batch_size=2)
    before_size = weight().numel()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    local = weight().to_local() if hasattr(weight(), "to_local") else weight()
    after_loss, after_grads = step()
    after_answers = evaluation.generate_answers(model, tok, None, items, 4, batch_size=2)
    diff = max(max(abs(a - b) for a, b in zip(_flat(before_grads[n]), _flat(after_grads[n]), strict=True))
               for n in before_grads)
    scale = max(max(abs(a) for a in _flat(g)) for g in before_grads.values())
    return {"weight_elements": before_size, "weight_elements_on_this_rank": local.numel(),
            "weight_dtype": str(local.dtype), "loss": [before_loss, after_loss], "lora_tensors": len(before_grads),
            "grad_max_difference": diff, "grad_max": scale, "answers": [before_answers, after_answers]}


def _flat(values):
    for v in values:
        if isinstance(v, list):
            yield from _flat(v)
        else:
            yield v


def main(model_dir: str, mode: str, out: str) -> int:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from entrypoints import evaluation
    from entrypoints.errors import JobError
    from entrypoints.suites import SuiteItem

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if mode == "prequantized":
        (Path(out) / f"rank-{rank}.json").write_text(json.dumps(prequantized(model_dir, rank)))
        dist.destroy_process_group()
        return 0
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    items = [SuiteItem(f"s.jsonl:{i}", None, f"Question number {i}?" + " more" * i, "yes", "contains")
             for i in range(5)]
    evaluation.auto_generation_batch = lambda *args: 3 if rank == 0 else 2
    real_generate, sizes = model.generate, []

    def generate(**kwargs):
        sizes.append(len(kwargs["input_ids"]))
        if mode == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_generate(**kwargs)

    model.generate = generate
    try:
        answers = evaluation.generate_answers(model, tok, None, items, 3, batch_size=0, what="eval suite s")
    except JobError as exc:
        report = {"exit_code": exc.exit_code, "error": str(exc), "sizes": sizes}
    else:
        report = {"answers": answers, "sizes": sizes}
    (Path(out) / f"rank-{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
