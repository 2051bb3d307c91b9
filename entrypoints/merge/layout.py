"""The base model's layout and the output's: what the base holds, whether the adapter fits it, the output shards.

The base is inspected from its config.json and safetensors headers only (for an s3:// base whose shards are not
downloaded yet, from its index and the architecture built on the meta device); no weight is read here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from entrypoints import bnb4bit
from entrypoints.errors import ModelError
from entrypoints.merge.adapter import Adapter
from entrypoints.merge.safetensors_io import TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"




@dataclass
class BaseModel:
    dir: Path
    config: dict
    shapes: dict[str, tuple[object, tuple[int, ...]]]  # key -> (dtype, shape)
    weight_map: dict[str, str]  # key -> shard file name, in file order
    tied: dict[str, str]  # absent tied key (lm_head.weight) -> the key it shares (model.embed_tokens.weight)
    quantized: set[str]  # weight keys transformers' bitsandbytes quantizer makes 4-bit
    headers: dict[str, dict[str, TensorInfo]] = field(default_factory=dict)  # local shard -> header
    # A pre-quantized (bitsandbytes 4-bit) base: its form, and each stored 4-bit weight's parts ({part: key}, the
    # packed values under `weight`); `shapes` gives such a weight its dequantized dtype and shape.
    stored: bnb4bit.Stored4bit | None = None
    stored_parts: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def files(self) -> list[str]:
        return list(dict.fromkeys(self.weight_map.values()))

    @property
    def state_keys(self) -> set[str]:
        """The quantization-state tensors of the stored 4-bit weights: read with their weight, never written out."""
        return {k for parts in self.stored_parts.values() for name, k in parts.items() if name != "weight"}

    def sources(self, key: str) -> list[str]:
        """The base tensors an output tensor is made from: itself (or the tensor it is tied to), or a stored 4-bit
        weight's packed values and state."""
        key = self.tied.get(key, key) if key not in self.weight_map else key
        return list(self.stored_parts[key].values()) if key in self.stored_parts else [key]


def _meta_model(base_dir: Path, config: dict):
    """The model's skeleton on the meta device (no memory): tied weights and Linear modules come from it. A causal
    LM, or an encoder-decoder (T5: `shared` embedding, q/k/v/o, wi or wi_0/wi_1, wo) with its LM head."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from entrypoints.sizing import is_encoder_decoder

    try:
        hf_config = AutoConfig.from_pretrained(str(base_dir))
        if hasattr(hf_config, "quantization_config"):
            del hf_config.quantization_config
        auto_class = AutoModelForSeq2SeqLM if is_encoder_decoder(config) else AutoModelForCausalLM
        with torch.device("meta"):
            return auto_class.from_config(hf_config)
    except (ValueError, KeyError, OSError, ImportError) as exc:
        raise ModelError(f"{base_dir / 'config.json'}: transformers cannot build this architecture ({exc}); only"
                         " transformers' own causal-LM and sequence-to-sequence LM architectures can be merged"
                         ) from None


def quantized_keys(model) -> set[str]:
    """The weights transformers' bnb quantizer turns 4-bit: plain nn.Linear minus its default skip list."""
    import torch
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = list(set(get_keys_to_not_convert(model)) | set(getattr(model, "_keep_in_fp32_modules", None) or ()))
    return {f"{name}.weight" for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and should_convert_module(name, skip)}


def inspect_base(base_dir: Path, remote_files: list[str] | None = None) -> BaseModel:
    """Read the base's config and tensor layout. `remote_files`: shard names not downloaded yet (s3 base)."""
    import torch

    config_path = base_dir / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{config_path} is missing: the base must be a transformers model directory")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config_path} is not valid JSON ({exc})") from None
    # A bitsandbytes 4-bit base is merged by dequantizing its stored weights; another quantization (8-bit, GPTQ,
    # AWQ...) is refused. A GGUF conversion leaves its quantization_config behind but writes float tensors: fine.
    stored = bnb4bit.stored_quantization(config, str(config_path))
    index_path = base_dir / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = dict(json.loads(index_path.read_text())["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{index_path} is not a valid safetensors index ({exc})") from None
    elif (base_dir / SINGLE_NAME).is_file() or (remote_files and SINGLE_NAME in remote_files):
        weight_map = None
    else:
        pickles = sorted(p.name for p in base_dir.glob("*.bin")) + sorted(p.name for p in base_dir.glob("*.pt"))
        if pickles:
            raise ModelError(f"{base_dir} holds pickle weights ({', '.join(pickles[:3])}) and no safetensors: pickle"
                             " can run code when loaded. Convert once with transformers (from_pretrained then"
                             " save_pretrained writes safetensors) and merge into that")
        raise ModelError(f"{base_dir} has no {SINGLE_NAME} or {INDEX_NAME}: pass the base model's directory")

    headers: dict[str, dict[str, TensorInfo]] = {}
    shapes: dict[str, tuple[object, tuple[int, ...]]] = {}
    meta = _meta_model(base_dir, config)
    remote = set(remote_files or ())
    if weight_map is None:
        weight_map = {key: SINGLE_NAME for key in _local_header(base_dir, SINGLE_NAME, headers)}
    for name in dict.fromkeys(weight_map.values()):
        if name in remote:
            continue
        header = _local_header(base_dir, name, headers)
        listed = {k for k, v in weight_map.items() if v == name}
        if set(header) != listed:
            extra = sorted(set(header) ^ listed)[:3]
            raise ModelError(f"{base_dir / name} and {INDEX_NAME} disagree about its tensors (e.g. {extra}):"
                             " re-download the base model")
        shapes.update({k: (t.dtype, t.shape) for k, t in header.items()})
    if remote:
        # Shards not downloaded yet: their shapes come from the architecture (checked again when each arrives).
        dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"))
        params = {**dict(meta.named_parameters()), **dict(meta.named_buffers())}
        for key, name in weight_map.items():
            if name in remote and key in params:
                shapes[key] = (dtype if params[key].is_floating_point() else params[key].dtype,
                               tuple(params[key].shape))
    tied = {target: source for target, source in (getattr(meta, "all_tied_weights_keys", None) or {}).items()
            if target not in weight_map and source in weight_map}
    base = BaseModel(base_dir, config, shapes, weight_map, tied, quantized_keys(meta), headers)
    if stored is not None:
        _describe_stored(base, stored, meta, local_complete=not remote)
    return base


def _describe_stored(base: BaseModel, stored: bnb4bit.Stored4bit, meta, local_complete: bool) -> None:
    """A pre-quantized base: its 4-bit weights (told by their names), each given the dequantized dtype and the shape
    of the architecture's layer; their state tensors leave `shapes` (they are not written out). A local base is
    checked whole first (every weight's parts present and of consistent sizes); a remote shard's weights are checked
    as they are dequantized."""
    import torch

    if local_complete:
        bnb4bit.check_checkpoint(base.dir, stored)
    base.stored, base.stored_parts = stored, bnb4bit.groups(base.weight_map)
    params = dict(meta.named_parameters())
    dtype = getattr(torch, stored.dtype)
    unknown = sorted(k for k in base.stored_parts if k not in params)
    if unknown:
        raise ModelError(f"{base.dir}: stored 4-bit weights the architecture of config.json does not have:"
                         f" {', '.join(unknown[:3])}: use the model's own config.json")
    for key in base.stored_parts:
        base.shapes[key] = (dtype, tuple(params[key].shape))
    for key in base.state_keys:
        base.shapes.pop(key, None)


def _local_header(base_dir: Path, name: str, headers: dict) -> dict[str, TensorInfo]:
    path = base_dir / name
    if not path.is_file():
        raise ModelError(f"{path} is missing (listed in {INDEX_NAME}): re-download the base model")
    headers[name] = read_header(path)
    return headers[name]


def check_compatible(base: BaseModel, adapter: Adapter) -> None:
    """Every adapter tensor must name a base tensor of the right shape; all problems are reported at once."""
    problems = []
    where = adapter.dir / "adapter_model.safetensors"

    def base_shape(key: str):
        key = key if key in base.shapes else base.tied.get(key, key)
        return base.shapes.get(key, (None, None))

    for key, delta in adapter.deltas.items():
        dtype, shape = base_shape(key)
        if shape is None:
            problems.append(f"LoRA module {delta.module!r} has no weight {key!r} in the base")
        elif tuple(shape) != delta.out_shape:
            problems.append(f"LoRA module {delta.module!r} makes a {list(delta.out_shape)} delta but the base's {key!r}"
                            f" is {list(shape)}")
        elif not dtype.is_floating_point:
            problems.append(f"base weight {key!r} is {dtype}, not a floating-point weight (a pre-quantized base?"
                            " merge into the 16-bit base)")
    for key, delta in adapter.bias_deltas.items():
        _, shape = base_shape(key)
        if shape is None:
            problems.append(f"LoRA module {delta.module!r} has lora_B.bias but the base has no {key!r}")
        elif tuple(shape) != tuple(delta.bias.shape):
            problems.append(f"lora_B.bias of {delta.module!r} is {list(delta.bias.shape)}, base {key!r} is {list(shape)}")
    for key, tensor in adapter.replacements.items():
        _, shape = base_shape(key)
        if shape is None:
            problems.append(f"saved module tensor {key!r} (modules_to_save) has no counterpart in the base")
        elif tuple(shape) != tuple(tensor.shape):
            problems.append(f"saved module tensor {key!r} is {list(tensor.shape)} but the base's is {list(shape)}"
                            " (was the vocabulary resized? merge into the resized base)")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ModelError(f"{where} does not fit the base model in {base.dir} ({len(problems)} problem(s)): {shown}."
                         f" The adapter was trained on {adapter.config.get('base_model_name_or_path') or 'another model'}:"
                         " pass that base model")


@dataclass
class OutputShard:
    name: str
    entries: list[tuple[str, object, tuple[int, ...]]]  # (key, dtype, shape)


def plan_shards(base: BaseModel, adapter: Adapter, max_shard_bytes: int | None) -> tuple[list[OutputShard], list[str]]:
    """Output shards (the base's layout, or repacked to max_shard_bytes) and the tied keys that get untied.

    A tied weight (lm_head sharing embed_tokens) is written on its own when the adapter changes either
    side: the unmerged model computes embed_tokens and lm_head separately, so they differ after a merge.
    (peft's merge_and_unload keeps them tied and adds both deltas to the shared tensor, which changes the
    model's outputs.)
    """
    untie = [t for t, s in base.tied.items() if adapter.touches(t) or adapter.touches(s)]
    keys_by_file: dict[str, list[str]] = {}
    state_keys = base.state_keys
    for key, name in base.weight_map.items():
        if key not in state_keys:  # a stored 4-bit weight's state: dequantized into its weight
            keys_by_file.setdefault(name, []).append(key)
    for target in untie:
        keys_by_file[base.weight_map[base.tied[target]]].append(target)

    def entry(key):
        dtype, shape = base.shapes[base.tied.get(key, key)] if key not in base.shapes else base.shapes[key]
        return (key, dtype, tuple(shape))

    keys_by_file = dict(sorted(keys_by_file.items()))  # shard files are numbered: write them in order
    if max_shard_bytes is None:
        return [OutputShard(name, [entry(k) for k in keys]) for name, keys in keys_by_file.items()], untie
    groups: list[list] = [[]]
    size = 0
    for keys in keys_by_file.values():
        for key in keys:
            e = entry(key)
            nbytes = math.prod(e[2]) * e[1].itemsize
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(e)
            size += nbytes
    n = len(groups)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    return [OutputShard(name, group) for name, group in zip(names, groups, strict=True)], untie



def listed_shards(base_dir: Path) -> list[str]:
    index_path = base_dir / INDEX_NAME
    if index_path.is_file():
        try:
            return list(dict.fromkeys(json.loads(index_path.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"{index_path} is not a valid safetensors index ({exc})") from None
    return [SINGLE_NAME]
