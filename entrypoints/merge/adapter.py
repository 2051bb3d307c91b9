"""A peft LoRA adapter, read and checked: which base weight each delta goes to, with its scale.

Only what this merge reproduces exactly is accepted (Linear and Embedding LoRA, DoRA on Linear, rsLoRA, rank and
alpha patterns, modules_to_save, LoRA biases); any other option is refused with the reason, before anything is
written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from entrypoints.errors import ModelError
from entrypoints.merge.safetensors_io import read_header

ADAPTER_PREFIX = "base_model.model."
# LoraConfig fields that change what the adapter computes in ways this merge does not reproduce. A value
# other than these defaults is refused with a clear error instead of producing a wrong model.
UNSUPPORTED_ADAPTER_OPTIONS = {
    "fan_in_fan_out": False, "use_qalora": False, "layer_replication": None, "megatron_config": None,
    "trainable_token_indices": None, "target_parameters": None, "use_bdlora": None, "arrow_config": None,
    "kasa_config": None, "velora_config": None, "monteclora_config": None, "alora_invocation_tokens": None,
}
# Initialisations that rewrite the base weights (the adapter only works on that rewritten base).
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# The tensors of one adapted module, by the end of their key: A, B (and B's bias) of a Linear, A and B of an
# Embedding, and DoRA's magnitude (saved with or without `.weight`).
LORA_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "B_bias",
    ".lora_embedding_A": "EA", ".lora_embedding_B": "EB",
    ".lora_magnitude_vector": "M", ".lora_magnitude_vector.weight": "M",
}


@dataclass
class LoraDelta:
    """One adapted module: its delta is scale * B @ A (Linear) or scale * (B @ A).T (Embedding)."""

    module: str
    kind: str  # "linear" or "embedding"
    a: object
    b: object
    scale: float
    magnitude: object | None = None  # DoRA
    bias: object | None = None  # lora_B.bias (lora_bias=True)

    @property
    def out_shape(self) -> tuple[int, int]:
        if self.kind == "linear":
            return (self.b.shape[0], self.a.shape[1])
        return (self.a.shape[1], self.b.shape[0])


@dataclass
class Adapter:
    dir: Path
    config: dict
    deltas: dict[str, LoraDelta] = field(default_factory=dict)  # base weight key -> delta
    bias_deltas: dict[str, LoraDelta] = field(default_factory=dict)  # base bias key -> delta with .bias
    replacements: dict[str, object] = field(default_factory=dict)  # base key -> full tensor (modules_to_save)

    def touches(self, key: str) -> bool:
        return key in self.deltas or key in self.bias_deltas or key in self.replacements


def load_adapter(adapter_dir: Path) -> Adapter:
    """Read and check a peft LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""
    config, weights_path, tensors = _read_adapter_files(adapter_dir)
    adapter = Adapter(adapter_dir, config)
    parts = _split_by_module(tensors, weights_path, adapter.replacements)
    for module, p in sorted(parts.items()):
        delta = _lora_delta(module, p, config, weights_path)
        if delta.bias is not None:
            adapter.bias_deltas[module + ".bias"] = delta
        adapter.deltas[module + ".weight"] = delta
    if not adapter.deltas and not adapter.replacements:
        raise ModelError(f"{weights_path} holds no LoRA weights: nothing to merge")
    return adapter


def _read_adapter_files(adapter_dir: Path) -> tuple[dict, Path, dict[str, object]]:
    """The config (checked for options this merge does not support), the weights' path and the tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path = adapter_dir / "adapter_config.json"
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file():
        raise ModelError(f"{config_path} is missing: pass the directory written by the adapter's save_pretrained")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config_path} is not valid JSON ({exc}): re-save the adapter") from None
    _check_adapter_config(config, config_path)
    if not weights_path.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise ModelError(f"{adapter_dir} holds adapter_model.bin (pickle, which can run code when loaded):"
                             " re-save the adapter with save_pretrained(safe_serialization=True)")
        raise ModelError(f"{weights_path} is missing: pass the directory written by the adapter's save_pretrained")
    read_header(weights_path)  # a clear error for a truncated or corrupt file before the loader sees it
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ModelError(f"{weights_path} cannot be read ({exc}): re-download or re-save the adapter") from None
    return config, weights_path, tensors


def _split_by_module(tensors: dict[str, object], weights_path: Path,
                     replacements: dict[str, object]) -> dict[str, dict[str, object]]:
    """module -> {role: tensor} for the LoRA tensors; full tensors go to `replacements` (base key -> tensor)."""
    parts: dict[str, dict[str, object]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(ADAPTER_PREFIX):
            raise ModelError(f"{weights_path}: key {key!r} does not start with {ADAPTER_PREFIX!r}; this is not a"
                             " peft adapter of a transformers model: re-save it with peft's save_pretrained")
        name = key[len(ADAPTER_PREFIX):]
        for suffix, role in LORA_SUFFIXES.items():
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[role] = tensor
                break
        else:
            if "lora_" in name:
                raise ModelError(f"{weights_path}: key {key!r} is a LoRA tensor this merge does not know; only"
                                 " Linear and Embedding LoRA (optionally DoRA) adapters are supported")
            # Full tensors saved with the adapter (modules_to_save, trained biases, or the embedding copies
            # peft saves as `<module>.base_layer.weight`) replace the base's, as PeftModel.from_pretrained does.
            replacements[name.replace(".base_layer.", ".")] = tensor
    return parts


def _lora_delta(module: str, p: dict[str, object], config: dict, weights_path: Path) -> LoraDelta:
    """One module's delta from its tensors, checked: both halves, shapes that multiply, the configured rank."""
    if "A" in p or "B" in p:
        kind, a, b = "linear", p.get("A"), p.get("B")
    else:
        kind, a, b = "embedding", p.get("EA"), p.get("EB")
    if a is None or b is None:
        raise ModelError(f"{weights_path}: module {module!r} has only half of its LoRA pair"
                         f" ({', '.join(sorted(p))}): the file is incomplete, re-save the adapter")
    if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
        raise ModelError(f"{weights_path}: module {module!r} has LoRA shapes A {list(a.shape)} and B"
                         f" {list(b.shape)}, which do not multiply (only 2-D Linear/Embedding LoRA is supported)")
    rank = a.shape[0]
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    expected_rank = rank_pattern.get(_pattern_key(rank_pattern, module), config.get("r"))
    if expected_rank is not None and int(expected_rank) != rank:
        raise ModelError(f"{weights_path}: module {module!r} has rank {rank} but adapter_config.json says"
                         f" r={expected_rank}: the config and weights come from different adapters")
    alpha = float(alpha_pattern.get(_pattern_key(alpha_pattern, module), config.get("lora_alpha", 8)))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    delta = LoraDelta(module, kind, a, b, scale, magnitude=p.get("M"), bias=p.get("B_bias"))
    if delta.magnitude is not None:
        if kind != "linear":
            raise ModelError(f"{weights_path}: DoRA on the embedding {module!r} is not supported: retrain with"
                             " use_dora=False for embeddings, or merge with peft's merge_and_unload")
        if tuple(delta.magnitude.shape) != (b.shape[0],):
            raise ModelError(f"{weights_path}: DoRA magnitude of {module!r} has shape"
                             f" {list(delta.magnitude.shape)}, expected [{b.shape[0]}]")
    return delta


def _pattern_key(patterns: dict, module: str) -> str:
    if not patterns:
        return module
    from peft.utils.other import get_pattern_key

    return get_pattern_key(list(patterns), module)


def _check_adapter_config(config: dict, path: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters can be merged here")
    problems = [f"{name}={config[name]!r}" for name, default in UNSUPPORTED_ADAPTER_OPTIONS.items()
                if config.get(name, default) not in (default, None, False, [], {})]
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        problems.append(f"init_lora_weights={init!r} (it rewrote the base weights: merge into that rewritten base,"
                        " or convert the adapter with peft's path_initial_model_for_weight_conversion)")
    if config.get("ensure_weight_tying"):
        problems.append("ensure_weight_tying=True")
    if problems:
        raise ModelError(f"{path}: adapter options this merge does not support: {'; '.join(problems)}. Retrain"
                         " without them or merge with peft's merge_and_unload (which needs the whole model in memory)")
