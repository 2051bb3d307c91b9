"""Peak memory and time of our streaming merge against peft's merge_and_unload, on a random checkpoint.

    python -m entrypoints.bench.merge_memory --shape 7b --work-dir /work/merge-bench [--json results.json]
    python -m entrypoints.bench.merge_memory --shape 70b --plan-only    # memory bound from the shapes alone
    python -m entrypoints.bench.merge_memory --compare-bases --model DIR --data entrypoints/demo/data --work-dir D

Builds a random bf16 checkpoint of the given Llama-2 shape, written tensor by tensor (never the whole
model in memory) in the real checkpoint's shard layout, and an r=16 all-linear LoRA adapter in peft's
format. Then each merge runs in its own subprocess, with the base shards evicted from the page cache
first (cold start for both): ours (`entrypoints.merge.merge_adapter`) and what users do with peft (load
the model in bf16 on CPU, `PeftModel.from_pretrained`, `merge_and_unload`, `save_pretrained`). Peak
resident memory is the child's ru_maxrss (from wait4); wall time includes process start. A sample of
output tensors is compared between the two. Everything it wrote is deleted at the end (--keep keeps it).

--compare-bases is the evidence for merge's default `merge_into`: it QLoRA-trains an adapter on a real
small model (nf4, double quant, r=16 all-linear, on CPU) and reports the held-out loss of the unmerged
4-bit+adapter model, of the merge into the original 16-bit base and of the merge into the nf4-dequantised
base.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from entrypoints.sizing import SHAPES as SIZES
from entrypoints.sizing import ModelShape

GB = 1e9
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# g5.2xlarge: 32 GiB of RAM.
G5_2XLARGE_RAM_BYTES = 32 * 2**30


# Llama 2's shapes (entrypoints/sizing.py) and a small one for CPU tests; the published checkpoints' shard counts
# (Llama-2-7b-hf: 2 files of <= 10 GB; 70b-hf: 15 files).
SHAPES = {**{name: SIZES[name] for name in ("7b", "13b", "70b")},
          "tiny": ModelShape("tiny (merge)", 256, 688, 2, 4, 4, 1000)}
SHARDS = {"7b": 2, "13b": 3, "70b": 15, "tiny": 2}


def shards_of(shape: ModelShape) -> int:
    return next(SHARDS[name] for name, known in SHAPES.items() if known == shape)


def llama_config(shape: ModelShape):
    from transformers import LlamaConfig

    return LlamaConfig(**shape.llama_config(), dtype="bfloat16")


def tensor_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Checkpoint keys and shapes, from the architecture on the meta device (nothing allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(llama_config(shape))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def split_evenly(keys: list[str], shapes: dict, parts: int) -> list[list[str]]:
    total = sum(math.prod(shapes[k]) for k in keys)
    groups: list[list[str]] = [[]]
    done = 0
    for key in keys:
        if groups[-1] and done >= total * len(groups) / parts and len(groups) < parts:
            groups.append([])
        groups[-1].append(key)
        done += math.prod(shapes[key])
    return groups


def build_checkpoint(shape: ModelShape, base_dir: Path, adapter_dir: Path, rank: int = 16) -> dict:
    """A random bf16 checkpoint and an all-linear LoRA adapter, one tensor in memory at a time."""
    import torch
    from peft import LoraConfig

    from entrypoints.merge.safetensors_io import write_safetensors

    torch.manual_seed(0)
    shapes = tensor_shapes(shape)
    base_dir.mkdir(parents=True, exist_ok=True)
    llama_config(shape).save_pretrained(base_dir)

    def random_bf16(key: str):
        return (torch.randn(shapes[key]) * 0.02).to(torch.bfloat16)

    # Layer order like the published checkpoints (embeddings first, head last).
    keys = sorted(shapes, key=lambda k: (k != "model.embed_tokens.weight", k == "lm_head.weight",
                                         _layer_index(k), k))
    groups = split_evenly(keys, shapes, shards_of(shape))
    n = len(groups)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        total += write_safetensors(base_dir / name, [(k, torch.bfloat16, shapes[k]) for k in group], random_bf16)
        weight_map.update({k: name for k in group})
        print(f"  wrote {name}", flush=True)
    (base_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    adapter_dir.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM",
               base_model_name_or_path=str(base_dir)).save_pretrained(adapter_dir)
    entries, makers = [], {}
    for key, s in shapes.items():
        module = key.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in LORA_TARGETS:
            out_features, in_features = s
            # peft keeps LoRA weights in float32 (autocast_adapter_dtype); B is nonzero so the merge matters.
            for suffix, lora_shape in ((".lora_A.weight", (rank, in_features)), (".lora_B.weight", (out_features, rank))):
                name = f"base_model.model.{module}{suffix}"
                entries.append((name, torch.float32, lora_shape))
                makers[name] = lora_shape
    adapter_bytes = write_safetensors(adapter_dir / "adapter_model.safetensors", entries,
                                      lambda k: torch.randn(makers[k]) * 0.01)
    return {"base_bytes": total, "adapter_bytes": adapter_bytes, "shards": n,
            "largest_tensor_bytes": max(math.prod(s) * 2 for s in shapes.values())}


def _layer_index(key: str) -> int:
    parts = key.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else -1


def evict_page_cache(directory: Path) -> None:
    """Drop the files' cached pages so every run starts cold (no root needed: we own the files)."""
    for path in directory.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_child(which: str, base_dir: Path, adapter_dir: Path, out_dir: Path) -> dict:
    """One merge in a fresh process: its peak RSS (ru_maxrss via wait4) and wall time."""
    evict_page_cache(base_dir)
    cmd = [sys.executable, "-m", "entrypoints.bench.merge_memory", "--child", which,
           "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out_dir)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"which": which, "exit_code": proc.returncode, "seconds": round(seconds, 1),
            "peak_rss_bytes": usage.ru_maxrss * 1024}


def child(which: str, base_dir: Path, adapter_dir: Path, out_dir: Path) -> None:
    import torch

    if which == "ours":
        from entrypoints.merge import merge_adapter

        merge_adapter(base_dir, adapter_dir, out_dir, merge_into="original", device="cpu")
        return
    # What users do with peft (the documented path): the whole 16-bit model in memory.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    merged = model.merge_and_unload()
    merged.save_pretrained(str(out_dir))


def compare_outputs(ours: Path, peft: Path, keys: list[str]) -> float:
    """Largest absolute difference over a sample of tensors of the two merged checkpoints."""
    from entrypoints.merge.safetensors_io import read_header, read_tensor

    def headers(d: Path) -> dict:
        found = {}
        for f in sorted(d.glob("*.safetensors")):
            found.update(read_header(f))
        return found

    a, b = headers(ours), headers(peft)
    worst = 0.0
    for key in keys:
        x, y = read_tensor(a[key]).float(), read_tensor(b[key]).float()
        worst = max(worst, (x - y).abs().max().item())
    return worst


def plan_peak(shape: ModelShape, rank: int = 16, runtime_bytes: float = 0.0) -> dict:
    """Peak memory of our merge from the shapes: runtime + adapter + 3 x the largest tensor + float32 blocks.

    Three tensors: the one being merged and written, one read ahead in the queue, one being read. The base
    is read one tensor at a time (not one shard), so a shard (plus the adapter and runtime) bounds it from
    above. `runtime_bytes`: the interpreter, torch and transformers, measured on the 7b run.
    """
    from entrypoints.merge.core import BLOCK_ELEMENTS

    shapes = tensor_shapes(shape)
    params = sum(math.prod(s) for s in shapes.values())
    largest = max(math.prod(s) * 2 for s in shapes.values())
    adapter = sum((s[0] + s[1]) * rank * 4 for k, s in shapes.items()
                  if k.removesuffix(".weight").rsplit(".", 1)[-1] in LORA_TARGETS)
    shard = params * 2 / shards_of(shape)
    blocks = 2 * BLOCK_ELEMENTS * 4  # the float32 block and its delta
    tensor_bound = runtime_bytes + adapter + 3 * largest + blocks
    shard_bound = runtime_bytes + adapter + shard + blocks
    return {"params": params, "checkpoint_bytes": params * 2, "largest_tensor_bytes": largest,
            "adapter_bytes": adapter, "shard_bytes": shard, "runtime_bytes": runtime_bytes,
            "peak_estimate_bytes": tensor_bound, "peak_shard_bound_bytes": shard_bound,
            "fits_g5_2xlarge": shard_bound < G5_2XLARGE_RAM_BYTES,
            "peft_needs_at_least_bytes": params * 2}


def plan_report(plan: dict) -> dict:
    """`plan_peak` for printing: every byte count in GB (10^9 bytes), its key saying so (`peak_estimate_gb`)."""
    report: dict = {"units": "GB = 10^9 bytes"}
    for key, value in plan.items():
        if key.endswith("_bytes"):
            report[key.removesuffix("_bytes") + "_gb"] = round(value / GB, 2)
        else:
            report[key] = value
    report["g5_2xlarge_ram_gb"] = round(G5_2XLARGE_RAM_BYTES / GB, 2)  # its 32 GiB
    return report


def _chat_examples(path: Path, tokenizer) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) per record; the loss is taken on the assistant reply only."""
    examples = []
    for line in path.read_text().splitlines():
        messages = json.loads(line)["messages"]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        if not full.startswith(prompt):
            raise ValueError("the chat template does not extend the prompt with the reply")
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        examples.append((ids, len(prompt_ids)))
    return examples


def _batch(examples, pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
        mask[i, : len(ids)] = 1
    return input_ids, mask, labels


def eval_loss(model, examples, pad_id: int) -> float:
    """Token-weighted mean cross-entropy over the reply tokens of all examples."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), 8):
            input_ids, mask, labels = _batch(examples[start: start + 8], pad_id)
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
            shifted = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     shifted.reshape(-1), ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((shifted != -100).sum())
    return total / count


def compare_bases(model_dir: Path, data_dir: Path, work: Path, *, epochs: int, learning_rate: float,
                  rank: int = 16, seed: int = 0) -> dict:
    """QLoRA-train on the demo data, merge both ways, and measure the held-out loss of each model."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from entrypoints.merge import merge_adapter

    torch.manual_seed(seed)
    work.mkdir(parents=True, exist_ok=True)
    base16 = work / "base-bf16"
    if not (base16 / "config.json").is_file():  # the 16-bit base as published (bf16)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(base16)
        AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(base16)
    tokenizer = AutoTokenizer.from_pretrained(str(base16))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = _chat_examples(data_dir / "train.jsonl", tokenizer)
    held_out = _chat_examples(data_dir / "eval.jsonl", tokenizer)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)

    def four_bit():
        return AutoModelForCausalLM.from_pretrained(str(base16), quantization_config=quant, dtype=torch.float32)

    results: dict = {"model": str(model_dir), "train_records": len(train), "eval_records": len(held_out),
                     "epochs": epochs, "learning_rate": learning_rate, "rank": rank}
    results["loss_base_16bit"] = eval_loss(AutoModelForCausalLM.from_pretrained(str(base16), dtype=torch.float32),
                                           held_out, pad_id)
    model = get_peft_model(four_bit(), LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05,
                                                  target_modules="all-linear", task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    started = time.monotonic()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train)).tolist()
        for start in range(0, len(order), 8):
            input_ids, mask, labels = _batch([train[i] for i in order[start: start + 8]], pad_id)
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        print(f"  epoch {epoch + 1}: last batch loss {loss.item():.3f}", flush=True)
    results["train_seconds"] = round(time.monotonic() - started, 1)
    adapter_dir = work / "adapter"
    model.save_pretrained(adapter_dir)
    results["loss_4bit_plus_adapter"] = eval_loss(PeftModel.from_pretrained(four_bit(), adapter_dir), held_out, pad_id)
    for merge_into in ("original", "nf4"):
        out = work / f"merged-{merge_into}"
        shutil.rmtree(out, ignore_errors=True)
        merge_adapter(base16, adapter_dir, out, merge_into=merge_into)
        for dtype_name in ("float32", "bfloat16"):
            merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=getattr(torch, dtype_name))
            results[f"loss_merged_{merge_into}_{dtype_name}"] = eval_loss(merged, held_out, pad_id)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m entrypoints.bench.merge_memory", description=__doc__.split("\n\n")[1])
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--work-dir", default="merge-bench")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--plan-only", action="store_true", help="only compute the memory bound from the shapes")
    p.add_argument("--runtime-gb", type=float, default=0.0,
                   help="measured runtime overhead in GB (10^9 bytes) to add in --plan-only (from a 7b run's JSON)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--compare-bases", action="store_true",
                   help="train a QLoRA adapter on --model/--data and compare the two merge bases' eval loss")
    p.add_argument("--model", default="", help="--compare-bases: a small causal LM directory (safetensors)")
    p.add_argument("--data", default="entrypoints/demo/data", help="--compare-bases: dir with train/eval.jsonl")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--child", choices=("ours", "peft"), help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, Path(args.base), Path(args.adapter), Path(args.out))
        return 0
    if args.compare_bases:
        results = compare_bases(Path(args.model), Path(args.data), Path(args.work_dir), epochs=args.epochs,
                                learning_rate=args.learning_rate)
        print(json.dumps(results, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        return 0
    shape = SHAPES[args.shape]
    if args.plan_only:
        plan = plan_peak(shape, runtime_bytes=args.runtime_gb * GB)
        print(json.dumps(plan_report(plan), indent=2))
        return 0

    work = Path(args.work_dir)
    need = sum(math.prod(s) for s in tensor_shapes(shape).values()) * 2 * 3.1  # base + two outputs
    free = shutil.disk_usage(work.parent if not work.exists() else work).free
    if free < need:
        print(f"not enough disk in {work}: {free / GB:.1f} GB free, {need / GB:.1f} GB needed", file=sys.stderr)
        return 2
    base_dir, adapter_dir = work / "base", work / "adapter"
    results: dict = {"shape": args.shape, "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
                     "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    try:
        print(f"building a random {args.shape} bf16 checkpoint in {base_dir}", flush=True)
        started = time.monotonic()
        results["checkpoint"] = build_checkpoint(shape, base_dir, adapter_dir)
        results["checkpoint"]["build_seconds"] = round(time.monotonic() - started, 1)
        runs = []
        for which in ("ours",) + (() if args.skip_peft else ("peft",)):
            print(f"running {which} merge", flush=True)
            runs.append(run_child(which, base_dir, adapter_dir, work / f"out-{which}"))
            print(f"  {runs[-1]}", flush=True)
        results["runs"] = runs
        if not args.skip_peft and all(r["exit_code"] == 0 for r in runs):
            sample = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                      f"model.layers.{shape.num_hidden_layers - 1}.mlp.down_proj.weight", "lm_head.weight"]
            results["max_abs_diff_ours_vs_peft"] = compare_outputs(work / "out-ours", work / "out-peft", sample)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.shape} merge, r=16 all-linear adapter, {results['checkpoint']['base_bytes'] / GB:.1f} GB bf16"
          f" checkpoint, {results['cpus']} CPUs")
    print("(GB = 10^9 bytes; wall time in seconds, process start included)")
    print(f"{'merge':<8}{'peak RSS (GB)':>15}{'wall (s)':>10}{'exit':>6}")
    for r in results["runs"]:
        print(f"{r['which']:<8}{r['peak_rss_bytes'] / GB:>15.2f}{r['seconds']:>10.1f}{r['exit_code']:>6}")
    if len(results["runs"]) == 2:
        ours, peft = results["runs"]
        print(f"ours/peft: memory {ours['peak_rss_bytes'] / peft['peak_rss_bytes']:.3f},"
              f" time {ours['seconds'] / peft['seconds']:.3f}; max |ours - peft| over sampled tensors:"
              f" {results.get('max_abs_diff_ours_vs_peft')}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["exit_code"] == 0 for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
