"""Write a random Llama-2-shaped checkpoint directly in bitsandbytes 4-bit form, one tensor at a time.

    python -m entrypoints.bench.prequantize --shape 70b --out /tmp/llama-70b-nf4   # ~37 GB instead of 138 GB

The benchmark's 16-bit random checkpoint of the 70B shape is 138 GB, more than the GPU machine's disk. This writes
the form a published `*-bnb-4bit` repository has (what transformers' save_pretrained writes for a model loaded
with a BitsAndBytesConfig: packed 4-bit weights beside their quantization state, config.json with its
quantization_config), never holding the model: each tensor is made on the device (random normal, std
initializer_range, as LlamaForCausalLM initialises; norms ones), its linear weights quantized there with
bitsandbytes' quantize_4bit, moved to the CPU and streamed into safetensors shards of at most 5 GB. The job loads the
result through its pre-quantized path (entrypoints.modeling: loaded as stored, nothing quantized again).

`write_prequantized` takes any stream of (name, tensor): the tests feed it a real model's tensors and compare the
files with transformers' own save_pretrained of the same model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from entrypoints import bnb4bit, sizing

MAX_SHARD_BYTES = 5 * 10**9  # transformers' default shard size
INDEX_NAME = "model.safetensors.index.json"


def llama_config(shape: sizing.ModelShape, quant_type: str = "nf4", double_quant: bool = True) -> Any:
    """transformers' LlamaConfig of `shape` (as the benchmark builds it), stored in 4 bits."""
    from transformers import LlamaConfig

    config = LlamaConfig(**shape.llama_config(), max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1,
                         eos_token_id=2)
    return stored_in_4bit(config, quant_type, double_quant)


def stored_in_4bit(config: Any, quant_type: str = "nf4", double_quant: bool = True) -> Any:
    """`config` (bf16 weights) carrying the BitsAndBytesConfig transformers saves with a model it loaded in 4 bits."""
    import torch
    from transformers import BitsAndBytesConfig

    config.dtype = torch.bfloat16
    config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.uint8)
    return config


def skeleton(config: Any) -> tuple[list[tuple[str, tuple[int, ...]]], set[str]]:
    """The model's tensors (name, shape) in state-dict order, and the names transformers' bitsandbytes quantizer makes
    4-bit (the merge's own list: entrypoints.merge.layout.quantized_keys), from the architecture on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    from entrypoints.merge.layout import quantized_keys

    plain = config.__class__.from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(plain)
    names = [(name, tuple(p.shape)) for name, p in model.state_dict().items()
             if name not in (getattr(model, "all_tied_weights_keys", None) or {})]
    return names, quantized_keys(model)


def random_tensors(names: Sequence[tuple[str, tuple[int, ...]]], std: float, device: str,
                   seed: int = 0) -> Iterator[tuple[str, Any]]:
    """bf16 tensors as LlamaForCausalLM initialises them (normal(0, std); the RMSNorm weights ones), made on `device`
    one at a time, each from its own seed."""
    import torch

    for i, (name, shape) in enumerate(names):
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=torch.bfloat16, device=device)
            continue
        generator = torch.Generator(device=device).manual_seed(seed * 100_003 + i)
        yield name, torch.randn(shape, generator=generator, device=device, dtype=torch.float32).mul_(std).to(
            torch.bfloat16)


def write_prequantized(model_dir: Path, config: Any, tensors: Iterable[tuple[str, Any]], quantized: set[str],
                       max_shard_bytes: int = MAX_SHARD_BYTES) -> dict[str, Any]:
    """Write config.json and the tensors of `tensors` as safetensors shards, those named in `quantized` in bitsandbytes
    4-bit (the type and double quantization of config.quantization_config), the others as they come. Shards are
    written as they fill (each to a temporary name, renamed once the count is known); at most one shard is held in
    memory. Returns what was written."""
    from entrypoints.merge.safetensors_io import write_safetensors

    quant = config.quantization_config
    model_dir.mkdir(parents=True, exist_ok=True)
    pending: dict[str, Any] = {}
    pending_bytes = 0
    parts: list[tuple[Path, list[str]]] = []
    counts = {"tensors": 0, "quantized": 0, "bytes": 0}

    def flush() -> None:
        nonlocal pending, pending_bytes
        if not pending:
            return
        path = model_dir / f"part-{len(parts):05d}.safetensors.tmp"
        entries = [(k, t.dtype, tuple(t.shape)) for k, t in pending.items()]
        counts["bytes"] += write_safetensors(path, entries, pending.pop)
        parts.append((path, [k for k, _, _ in entries]))
        pending, pending_bytes = {}, 0

    for name, tensor in tensors:
        if name in quantized:
            stored = bnb4bit.quantize(tensor, quant.bnb_4bit_quant_type, quant.bnb_4bit_use_double_quant)
            counts["quantized"] += 1
        else:
            stored = {"": tensor}
        del tensor
        size = sum(t.numel() * t.element_size() for t in stored.values())
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        for suffix, t in stored.items():
            pending[name + suffix] = t.to("cpu", non_blocking=False).contiguous()
        pending_bytes += size
        counts["tensors"] += 1
    flush()

    n = len(parts)
    names = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    weight_map = {}
    for (tmp, keys), final in zip(parts, names, strict=True):
        tmp.replace(model_dir / final)
        weight_map.update({k: final for k in keys})
    if n > 1:
        index = {"metadata": {"total_size": counts["bytes"]}, "weight_map": dict(sorted(weight_map.items()))}
        (model_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(model_dir)  # last: a directory without config.json is no checkpoint yet
    return {**counts, "shards": n}


def build(shape_name: str, model_dir: Path, device: str, quant_type: str = "nf4", double_quant: bool = True,
          seed: int = 0, max_shard_bytes: int = MAX_SHARD_BYTES) -> dict[str, Any]:
    """The random checkpoint of `shape_name` in 4-bit form (plus the benchmark's tokenizer); returns what was written
    and how long it took."""
    from entrypoints.bench.throughput import write_tokenizer

    started = time.monotonic()
    shape = sizing.SHAPES[shape_name]
    config = llama_config(shape, quant_type, double_quant)
    names, quantized = skeleton(config)
    written = write_prequantized(model_dir, config, random_tensors(names, config.initializer_range, device, seed),
                                 quantized, max_shard_bytes)
    write_tokenizer(model_dir, shape.vocab_size)
    on_disk = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    return {"shape": shape_name, "form": f"bitsandbytes {quant_type}, double quantization"
            f" {'on' if double_quant else 'off'}", "parameters": sum(math.prod(s) for _, s in names),
            "checkpoint_bytes": on_disk, **written, "build_seconds": round(time.monotonic() - started, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(prog="python -m entrypoints.bench.prequantize", description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(sizing.SHAPES), default="70b")
    p.add_argument("--out", required=True, help="directory to write (must not hold a config.json yet)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--quant-type", choices=bnb4bit.QUANT_TYPES, default="nf4")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false")
    args = p.parse_args(argv)
    out = Path(args.out)
    if (out / "config.json").exists():
        print(f"--out {out}: already holds a checkpoint", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps(build(args.shape, out, device, args.quant_type, args.double_quant)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
