"""The merge itself: the 4-bit round trip, adding a delta, and the streaming pipeline `merge_adapter`.

Each base tensor is read on its own, the LoRA delta scale * B @ A is added in float32 a block of rows at a time
(on the GPU when there is one) and the result is written, in the base dtype, straight into the output shard.
Peak memory is about one tensor plus the adapter, whatever the model size. Every output file is written to a
temporary name and renamed when complete; `on_file_written(path)` is then called so the caller can upload it
while the next shard is merged. The index is written last: an output without `model.safetensors.index.json`
is incomplete.
"""

from __future__ import annotations

import json
import logging
import queue
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from entrypoints import bnb4bit
from entrypoints.errors import ConfigError, ModelError, OutputExistsError
from entrypoints.merge.adapter import Adapter, LoraDelta, load_adapter
from entrypoints.merge.layout import (
    INDEX_NAME,
    BaseModel,
    OutputShard,
    check_compatible,
    inspect_base,
    listed_shards,
    plan_shards,
)
from entrypoints.merge.safetensors_io import TensorInfo, atomic_write_bytes, read_header, read_tensor, write_safetensors
from entrypoints.sizing import SEQ2SEQ_MODEL_TYPES

log = logging.getLogger("qlora.merge")

MERGE_INTO_CHOICES = ("original", "nf4", "fp4")
# The base as the 4-bit training saw it: the merged model then computes what was trained and evaluated
# (measured in docs/MERGE.md, "Which base to merge into"). Adapters trained on a 16-bit base
# (QLORA_QUANTIZATION=none) must pass `original`.
DEFAULT_MERGE_INTO = "nf4"
# Copied from the adapter dir when it has a tokenizer (the job saves the tokenizer it trained with there),
# else from the base.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
)
# float32 temporaries are limited to this many elements per block of rows (64 MiB): memory stays flat
# however wide the matrix, and blocks are still large enough for fast matmuls.
BLOCK_ELEMENTS = 16 * 1024 * 1024
# transformers' bnb 4-bit layers use bitsandbytes' default blocksize (Params4bit).
BNB_BLOCKSIZE = 64
# Output shards of a pre-quantized base, whose own shards hold 4-bit weights (a merged shard would be ~3.5x its
# base shard): transformers' default shard size.
PREQUANTIZED_SHARD_BYTES = 5 * 10**9


# ---------------------------------------------------------------------------------------------- the arithmetic


def roundtrip_4bit(weight, quant_type: str, double_quant: bool, device: str):
    """The weight as a bitsandbytes 4-bit layer computes with it: quantize, then dequantize (float32)."""
    import bitsandbytes.functional as bnbf
    import torch

    w = weight.to(device=device, dtype=torch.float32)
    packed, state = bnbf.quantize_4bit(w, blocksize=BNB_BLOCKSIZE, compress_statistics=double_quant,
                                       quant_type=quant_type)
    del w
    return bnbf.dequantize_4bit(packed, state).to(dtype=torch.float32)


def apply_delta(weight, delta: LoraDelta, out_dtype, device: str):
    """weight + delta (and the DoRA rescaling), computed in float32 a block of rows at a time."""
    import torch

    rows, cols = weight.shape
    out = weight if weight.dtype == out_dtype and weight.device.type == "cpu" else torch.empty(
        (rows, cols), dtype=out_dtype)
    a = delta.a.to(device=device, dtype=torch.float32)
    b = delta.b.to(device=device, dtype=torch.float32)
    magnitude = None if delta.magnitude is None else delta.magnitude.to(device=device, dtype=torch.float32)
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        end = min(rows, start + step)
        block = weight[start:end].to(device=device, dtype=torch.float32)
        if delta.kind == "linear":
            block.addmm_(b[start:end], a, alpha=delta.scale)
        else:  # embedding: A is (r, num_embeddings), B is (embedding_dim, r); delta = (B @ A).T
            block.addmm_(a[:, start:end].T, b.T, alpha=delta.scale)
        if magnitude is not None:
            # DoRA: each output row is rescaled to its learned magnitude over the norm of the merged row.
            block *= (magnitude[start:end] / torch.linalg.norm(block, dim=1)).unsqueeze(1)
        out[start:end].copy_(block)
    return out


# ---------------------------------------------------------------------------------------------- the merge


def merge_adapter(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    *,
    merge_into: str = DEFAULT_MERGE_INTO,
    on_file_written: Callable[[Path], None] | None = None,
    double_quant: bool = True,
    max_shard_size: int | str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    fetch_shard: Callable[[str], Path] | None = None,
    release_shard: Callable[[Path], None] | None = None,
) -> dict:
    """Merge the LoRA adapter in `adapter_dir` into the base model in `base_dir`, writing `out_dir`.

    merge_into: `original` (the 16-bit base) or `nf4`/`fp4` (the base as the 4-bit training saw it).
    double_quant: the training's bnb_4bit_use_double_quant (matters for nf4/fp4 only).
    A pre-quantized (bitsandbytes 4-bit) base is merged as the training saw it whatever these say: its stored
    4-bit weights dequantized (bitsandbytes' own dequantize_4bit) plus the delta; `original` is refused (it has no
    16-bit weights), and a 4-bit type or double quantization other than the stored one is logged and ignored.
    max_shard_size: bytes or "5GB"; default: the base's own shard layout (5GB for a pre-quantized base).
    device: `auto` uses the GPU for the arithmetic when there is one.
    fetch_shard / release_shard: for a base whose shards are not local yet (s3://): called with a shard's
    file name just before it is merged / with its local path once it has been read.
    Returns a summary (files written, tensors merged, seconds, peak resident memory of this process).
    """
    started = time.monotonic()
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    _check_arguments(base_dir, adapter_dir, out_dir, merge_into)
    device = _resolve_device(device)
    max_shard_bytes = _shard_size_bytes(max_shard_size)

    # 1. Everything is checked before anything is written.
    adapter, base, shards, untied = _check_and_plan(base_dir, adapter_dir, max_shard_bytes,
                                                    base_is_remote=fetch_shard is not None)
    if base.stored is not None:
        merge_into = _stored_merge_into(base, merge_into, double_quant)
    log.info("merging %d LoRA module(s) and %d saved tensor(s) into %s (%s base, %d shard(s), device %s)",
             len(adapter.deltas), len(adapter.replacements), base_dir,
             f"dequantized {base.stored.describe()}" if base.stored else merge_into, len(shards), device)
    # 2. The output directory: refuse to mix with an earlier result.
    _prepare_output_dir(out_dir, overwrite)
    written = _WrittenFiles(on_file_written)
    # 3. Small files first (config without quantization_config, generation config, tokenizer).
    _copy_small_files(base, adapter_dir, out_dir, untied, written)
    # 4. The shards, one tensor at a time, then the index.
    requantize = base.quantized if merge_into != "original" and base.stored is None else set()
    tensors = _TensorMerge(adapter, requantize, merge_into, double_quant, device)
    reader = _BaseReader(base, shards, fetch_shard, release_shard)
    total_bytes, weight_map = _write_shards(out_dir, shards, reader, tensors, written)
    _write_index(out_dir, total_bytes, weight_map, written)

    summary = {
        "base": str(base_dir), "adapter": str(adapter_dir), "output": str(out_dir), "merge_into": merge_into,
        "device": device, "files": [p.name for p in written.paths], "shards": len(shards),
        "total_bytes": total_bytes, "lora_modules_merged": tensors.counts["lora"],
        "tensors_replaced": tensors.counts["replaced"], "weights_requantized": tensors.counts["requantized"],
        "weights_dequantized": tensors.counts["dequantized"],
        "base_stored": base.stored.describe() if base.stored else None, "untied": untied, "seconds": round(time.monotonic() - started, 2), "peak_rss_bytes": _peak_rss_bytes(),
    }
    log.info("merge done: %d file(s), %.2f GB in %.1fs, peak RSS %.2f GB", len(written.paths), total_bytes / 1e9,
             summary["seconds"], summary["peak_rss_bytes"] / 1e9)
    return summary


def _stored_merge_into(base: BaseModel, merge_into: str, double_quant: bool) -> str:
    """What the merge into a pre-quantized base does: dequantize the stored weights, the only base the adapter can have
    been trained on. `original` asks for 16-bit weights the base does not have: a ConfigError (exit 2)."""
    stored = base.stored
    if merge_into == "original":
        raise ConfigError([f"merge_into=original: {base.dir} is a pre-quantized checkpoint ({stored.describe()}) with no"
                           " 16-bit weights to merge into: merge into its dequantized 4-bit weights (nf4/fp4, the"
                           " default), or pass the 16-bit model it was made from as the base"])
    if (merge_into, double_quant) != (stored.quant_type, stored.double_quant):
        log.info("the base is stored pre-quantized (%s): merging into its dequantized weights (merge_into=%s,"
                 " double_quant=%s describe another form and are not used)", stored.describe(), merge_into,
                 str(double_quant).lower())
    return stored.quant_type


def _check_arguments(base_dir: Path, adapter_dir: Path, out_dir: Path, merge_into: str) -> None:
    for name, source in (("base model", base_dir), ("adapter", adapter_dir)):
        a, b = out_dir.resolve(), source.resolve()
        if a == b or a.is_relative_to(b) or b.is_relative_to(a):
            raise ConfigError([f"the output {out_dir} and the {name} {source} overlap: writing the merged model there"
                               f" would delete or overwrite the {name} it is made from. Choose another output"])
    if merge_into not in MERGE_INTO_CHOICES:
        raise ModelError(f"merge_into={merge_into!r}: choose one of {', '.join(MERGE_INTO_CHOICES)}")


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _shard_size_bytes(max_shard_size: int | str | None) -> int | None:
    if max_shard_size is None:
        return None
    from transformers.utils.hub import convert_file_size_to_int

    try:
        return convert_file_size_to_int(max_shard_size)
    except ValueError:
        raise ConfigError([f"--max-shard-size {max_shard_size!r}: write bytes or a size like '5GB'"]) from None


def _check_and_plan(base_dir: Path, adapter_dir: Path, max_shard_bytes: int | None,
                    base_is_remote: bool) -> tuple[Adapter, BaseModel, list[OutputShard], list[str]]:
    """The adapter, the base, that the one fits the other, and the output shards (with the tied keys untied)."""
    adapter = load_adapter(adapter_dir)
    remote = None
    if base_is_remote:
        remote = [n for n in listed_shards(base_dir) if not (base_dir / n).is_file()]
    base = inspect_base(base_dir, remote)
    check_compatible(base, adapter)
    if max_shard_bytes is None and base.stored is not None:
        max_shard_bytes = PREQUANTIZED_SHARD_BYTES
    shards, untied = plan_shards(base, adapter, max_shard_bytes)
    return adapter, base, shards, untied


def _prepare_output_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{out_dir} is not empty: choose an empty output or pass --overwrite")
        for stale in [*out_dir.glob("*.safetensors"), out_dir / INDEX_NAME]:
            stale.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


@dataclass
class _WrittenFiles:
    """The output files in the order they were completed; each is handed to `on_file_written` at once."""

    on_file_written: Callable[[Path], None] | None
    paths: list[Path] = field(default_factory=list)

    def add(self, path: Path) -> None:
        self.paths.append(path)
        if self.on_file_written is not None:
            self.on_file_written(path)


def _copy_small_files(base: BaseModel, adapter_dir: Path, out_dir: Path, untied: list[str],
                      written: _WrittenFiles) -> None:
    """config.json (without quantization_config; untied if the plan unties), generation config, tokenizer."""
    config = dict(base.config)
    config.pop("quantization_config", None)
    # Where the base was loaded from (transformers drops it when it saves a config; some configs still carry one):
    # a path of the machine that made the base, meaningless to whoever loads the merged model.
    config.pop("_name_or_path", None)
    if untied:
        if config.get("model_type") in SEQ2SEQ_MODEL_TYPES and "scale_decoder_outputs" not in config:
            # T5 derives the scaling of its decoder's output from tie_word_embeddings when the config does not
            # state it (scaled when tied: T5 v1.0): untying must not change what the model computes.
            config["scale_decoder_outputs"] = config.get("tie_word_embeddings", True) is not False
        config["tie_word_embeddings"] = False
    atomic_write_bytes(out_dir / "config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    written.add(out_dir / "config.json")
    tokenizer_source = adapter_dir if any((adapter_dir / n).is_file() for n in TOKENIZER_FILES[:4]) else base.dir
    for name in ("generation_config.json", *TOKENIZER_FILES):
        source = (tokenizer_source if name in TOKENIZER_FILES else base.dir) / name
        if source.is_file():
            atomic_write_bytes(out_dir / name, source.read_bytes())
            written.add(out_dir / name)


@dataclass
class _TensorMerge:
    """What happens to one base tensor on its way to the output, and how often each thing happened."""

    adapter: Adapter
    requantize: set[str]  # weights that were 4-bit in training (nf4/fp4 merges), round-tripped first
    quant_type: str
    double_quant: bool
    device: str
    counts: dict[str, int] = field(default_factory=lambda: {"lora": 0, "replaced": 0, "requantized": 0,
                                                            "dequantized": 0})

    def merged(self, key: str, tensor, out_dtype=None, shape=None):
        """The output tensor of `key` (of the planned `out_dtype` and `shape`) from its base tensor: a tensor, or a
        stored 4-bit weight's parts ({part: tensor}), dequantized here."""
        adapter = self.adapter
        if isinstance(tensor, dict):
            tensor = bnb4bit.dequantize(key, tensor, self.device)
            if shape is not None and tuple(tensor.shape) != tuple(shape):
                raise ModelError(f"{key}: its stored 4-bit state says {list(tensor.shape)}, config.json's architecture"
                                 f" {list(shape)}: the config belongs to another model; use the model's own")
            self.counts["dequantized"] += 1
        out_dtype = out_dtype or tensor.dtype
        if key in adapter.replacements:
            tensor = adapter.replacements[key].to(out_dtype).clone()
            self.counts["replaced"] += 1
        if key in self.requantize and key not in adapter.replacements:
            tensor = roundtrip_4bit(tensor, self.quant_type, self.double_quant, self.device)
            self.counts["requantized"] += 1
        if key in adapter.deltas:
            tensor = apply_delta(tensor, adapter.deltas[key], out_dtype, self.device)
            self.counts["lora"] += 1
        if key in adapter.bias_deltas:
            d = adapter.bias_deltas[key]
            tensor = (tensor.float() + d.bias.float() * d.scale)
        return tensor.to(device="cpu", dtype=out_dtype)


class _BaseReader:
    """Reads the base tensors in the order the output shards are written, one ahead, in a background thread.

    Reading the next base tensor overlaps the arithmetic and the writing of this one (file reads and torch
    release the GIL); the queue holds one tensor, so at most three are in memory. A base shard that is not
    local yet (s3://) is fetched when its first tensor is read, checked against the plan, and released once
    the last output shard that uses it is written.
    """

    def __init__(self, base: BaseModel, shards: list[OutputShard], fetch_shard: Callable[[str], Path] | None,
                 release_shard: Callable[[Path], None] | None):
        self.base, self.fetch_shard, self.release_shard = base, fetch_shard, release_shard
        self.order = [key for shard in shards for key, _, _ in shard.entries]
        self.last_use = {base.weight_map[source]: i for i, s in enumerate(shards) for e in s.entries
                         for source in base.sources(e[0])}
        self.open_shards: dict[str, Path] = {}  # downloaded base shards still needed
        self.lock = threading.Lock()
        self.reads: queue.Queue = queue.Queue(maxsize=1)
        self.stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._read_all, name="merge-read", daemon=True).start()

    def next(self, key: str):
        """The base tensor of `key`, which must be the next in order; the reader's error is raised here."""
        read_key, tensor, error = self.reads.get()
        if error is not None:
            raise error
        if read_key != key:
            raise AssertionError(f"read {read_key} while writing {key}")
        return tensor

    def shard_written(self, index: int) -> None:
        """Forget the base shards no output shard after `index` reads, and release their local files."""
        with self.lock:
            done = [(n, self.open_shards.pop(n)) for n in list(self.open_shards) if self.last_use.get(n, -1) <= index]
            for name, _ in done:
                del self.base.headers[name]
        for _, local in done:
            if self.release_shard is not None:
                self.release_shard(local)

    def _read_all(self) -> None:
        for key in self.order:
            if self.stop.is_set():
                return
            try:
                source_key = self.base.tied.get(key, key) if key not in self.base.weight_map else key
                parts = self.base.stored_parts.get(source_key)
                if parts is not None:  # a stored 4-bit weight: its packed values and state, dequantized by the merge
                    tensor = {name: read_tensor(self._info(part)) for name, part in parts.items()}
                else:
                    tensor = read_tensor(self._info(source_key))
                self._hand_over((key, tensor, None))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread by next()
                self._hand_over((key, None, exc))
                return

    def _hand_over(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.reads.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _info(self, key: str) -> TensorInfo:
        base = self.base
        name = base.weight_map[key]
        with self.lock:
            if name in base.headers:
                return base.headers[name][key]
        path = self.fetch_shard(name)  # type: ignore[misc]  # only remote shards lack a header
        header = read_header(path)
        listed = {k for k, v in base.weight_map.items() if v == name}
        if set(header) != listed or any(tuple(header[k].shape) != tuple(base.shapes[k][1]) for k in listed
                                        if k in base.shapes and k not in base.stored_parts):
            raise ModelError(f"{name} of the base does not match {INDEX_NAME} and config.json: re-upload the base")
        with self.lock:
            base.headers[name] = header
            self.open_shards[name] = path
        return header[key]


def _write_shards(out_dir: Path, shards: list[OutputShard], reader: _BaseReader, tensors: _TensorMerge,
                  written: _WrittenFiles) -> tuple[int, dict[str, str]]:
    """Each output shard in turn, its tensors read, merged and streamed into the file; (bytes, weight map)."""
    reader.start()
    total_bytes = 0
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        path = out_dir / shard.name
        try:
            planned = {key: (dtype, shape) for key, dtype, shape in shard.entries}
            total_bytes += write_safetensors(
                path, shard.entries, lambda key, planned=planned: tensors.merged(key, reader.next(key), *planned[key]))
        except BaseException:
            reader.stop.set()  # the reader must not wait forever on a queue nobody reads
            raise
        weight_map.update({key: shard.name for key, _, _ in shard.entries})
        log.info("wrote %s (%d/%d)", shard.name, i + 1, len(shards))
        reader.shard_written(i)
        written.add(path)
    return total_bytes, weight_map


def _write_index(out_dir: Path, total_bytes: int, weight_map: dict[str, str], written: _WrittenFiles) -> None:
    """Written last: an output without its index is incomplete."""
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_bytes(out_dir / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
    written.add(out_dir / INDEX_NAME)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
