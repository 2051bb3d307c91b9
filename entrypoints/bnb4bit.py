"""Checkpoints stored in bitsandbytes 4-bit (the `*-bnb-4bit` form): what config.json and the safetensors hold.

    python -c "from entrypoints.bnb4bit import check_checkpoint; print(check_checkpoint(Path('model')))"

transformers (5) + bitsandbytes (0.50) save a 4-bit model's quantized weight `W` as the packed 4-bit values `W`
(uint8, or the storage dtype, shape [bytes, 1]) beside its quantization state: `W.absmax` (one scale per block of
64 weights; uint8 when the scales are quantized again, i.e. double quantization), `W.quant_map` (the 16 values of
nf4 or fp4), with double quantization `W.nested_absmax` and `W.nested_quant_map`, and
`W.quant_state.bitsandbytes__nf4` (or `__fp4`): a JSON object as bytes with the type, block sizes, the original
dtype and shape. config.json carries `quantization_config` (quant_method `bitsandbytes`, load_in_4bit,
bnb_4bit_quant_type, bnb_4bit_use_double_quant, ...).

One place for that knowledge: the job's loader checks such a checkpoint (`check_checkpoint`) and reads its settings
(`stored_quantization`), the merge dequantizes its weights with bitsandbytes' own functions (`dequantize`), the
benchmark writes one (`quantize`), and the launcher's sizing tells its size. Torch-free at import (the launcher
imports it); the functions that handle tensors import torch and bitsandbytes themselves.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrypoints.errors import ModelError

QUANT_TYPES = ("nf4", "fp4")
QUANT_STATE = "quant_state.bitsandbytes__"  # + quant type: the packed JSON part
# The parts of one stored 4-bit weight besides the packed values, by the name bitsandbytes' QuantState uses.
PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
NESTED_PARTS = ("nested_absmax", "nested_quant_map")
# Methods transformers can load but the job cannot train from (a LoRA on top of them needs their own kernels and a
# merge of their own): refused with a clear message. `gguf` is not among them: a GGUF conversion leaves its
# quantization_config behind but holds float tensors.
FLOAT_METHODS = ("gguf",)
# safetensors dtype names -> bytes per element (the ones a 4-bit checkpoint uses for its packed values and state).
ST_ITEMSIZE = {"U8": 1, "I8": 1, "BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}
FLOAT_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Stored4bit:
    """How a checkpoint's weights are stored: bitsandbytes 4-bit of `quant_type`, with or without double quantization.
    `dtype`: the dtype of its other tensors (config.json's), which the dequantized weights of a merge take."""

    quant_type: str
    double_quant: bool
    dtype: str = "bfloat16"

    def describe(self) -> str:
        return f"bitsandbytes {self.quant_type}, double quantization {'on' if self.double_quant else 'off'}"

    def as_dict(self) -> dict[str, Any]:
        return {"quant_method": "bitsandbytes", "quant_type": self.quant_type, "double_quant": self.double_quant}


def stored_quantization(config: Mapping[str, Any], where: str = "config.json") -> Stored4bit | None:
    """The 4-bit form a config.json (as a dict) says its weights are stored in; None for a 16/32-bit checkpoint.

    A ModelError (exit 4) for a quantization the job does not train from: bitsandbytes 8-bit, GPTQ, AWQ and every
    other method transformers knows."""
    quant = config.get("quantization_config")
    if not quant:
        return None
    if not isinstance(quant, Mapping):
        raise ModelError(f"{where}: quantization_config is {type(quant).__name__}, not an object: use the model's own"
                         " config.json")
    method = str(quant.get("quant_method") or ("bitsandbytes" if quant.get("load_in_4bit") or
                                               quant.get("load_in_8bit") else "")).lower()
    if method in FLOAT_METHODS:
        return None
    fix = ("point QLORA_MODEL at the 16-bit model (the job quantizes it to 4 bits as it loads) or at a bitsandbytes"
           " 4-bit checkpoint (nf4/fp4, the form of the *-bnb-4bit repositories)")
    if method == "bitsandbytes" and (quant.get("load_in_8bit") or quant.get("_load_in_8bit")):
        raise ModelError(f"{where}: the weights are stored in bitsandbytes 8-bit (LLM.int8), which QLoRA does not"
                         f" train on: {fix}")
    if method != "bitsandbytes" or not (quant.get("load_in_4bit") or quant.get("_load_in_4bit")):
        raise ModelError(f"{where}: the weights are stored quantized with {method or 'an unknown method'!r}"
                         f" (quantization_config), which the job does not train on: {fix}")
    quant_type = str(quant.get("bnb_4bit_quant_type") or "fp4")  # transformers' default when the key is absent
    if quant_type not in QUANT_TYPES:
        raise ModelError(f"{where}: quantization_config.bnb_4bit_quant_type={quant_type!r} is not a bitsandbytes"
                         f" 4-bit type ({', '.join(QUANT_TYPES)}): use the model's own config.json")
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    return Stored4bit(quant_type, bool(quant.get("bnb_4bit_use_double_quant", False)),
                      dtype if dtype in FLOAT_DTYPES else "bfloat16")


def groups(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """The stored 4-bit weights among checkpoint keys: weight key -> {part: key} with the parts `weight`,
    `quant_state` and those of PARTS that are present. Told by the names alone (no tensor is read)."""
    keys = set(keys)
    found: dict[str, dict[str, str]] = {}
    for key in keys:
        head, sep, quant_type = key.rpartition("." + QUANT_STATE)
        if not sep or quant_type not in QUANT_TYPES:
            continue
        parts = {"weight": head, "quant_state": key}
        parts.update({p: f"{head}.{p}" for p in PARTS if f"{head}.{p}" in keys})
        found[head] = parts
    return found


def part_keys(keys: Iterable[str]) -> set[str]:
    """Every key that is a part of a stored 4-bit weight other than its packed values (absmax, quant_map, ...)."""
    return {k for parts in groups(keys).values() for name, k in parts.items() if name != "weight"}


def describe_state(raw: bytes, where: str) -> dict[str, Any]:
    """The JSON of a `quant_state.bitsandbytes__*` tensor (bitsandbytes' pack_dict_to_tensor: UTF-8 bytes)."""
    try:
        state = json.loads(bytes(raw).decode("utf-8"))
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        state["shape"] = [int(d) for d in state["shape"]]
        state["blocksize"] = int(state["blocksize"])
        if "nested_blocksize" in state:
            state["nested_blocksize"] = int(state["nested_blocksize"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{where}: not a bitsandbytes quantization state ({exc}): the checkpoint is damaged;"
                         " download it again") from None
    return state


def packed_bytes(n: int, itemsize: int) -> int:
    """Bytes bitsandbytes' quantize_4bit stores n weights in, for a storage dtype of `itemsize` bytes (two 4-bit values
    a byte, in ((n + 1) // (2 * itemsize)) elements)."""
    return (n + 1) // (2 * itemsize) * itemsize


def check_checkpoint(model_dir: Path, stored: Stored4bit | None = None) -> None:
    """Every stored 4-bit weight of the safetensors in `model_dir` must be complete and consistent: its packed values,
    scales, maps and state all present, of the sizes its state's shape and block sizes need, of the type config.json
    says. transformers loads a weight whose scales lack their nested part without a word (and computes with wrong
    weights), and fails with an internal error on a missing part: a ModelError naming the weight instead."""
    headers = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        headers[file] = _raw_header(file)
    where = {key: (file, entry) for file, header in headers.items() for key, entry in header.items()}
    problems: list[str] = []
    found = groups(where)
    for weight, parts in sorted(found.items()):
        problems += _group_problems(weight, parts, where, stored)
    # Parts, or packed values (uint8, [n, 1]), of a weight whose quantization state is missing.
    orphans = {k.rsplit(".", 1)[0] for k in where if k.endswith(tuple("." + p for p in PARTS))}
    orphans |= {k for k, (_, e) in where.items() if stored is not None and k.endswith(".weight") and e["dtype"] == "U8"
                and len(e["shape"]) == 2 and e["shape"][1] == 1}
    for weight in sorted(orphans - set(found)):
        problems.append(f"{weight}: its quantization state ({QUANT_STATE}{stored.quant_type if stored else '*'}) is"
                        " missing")
    if stored is not None and not groups(where):
        problems.append("config.json says the weights are stored in bitsandbytes 4-bit, but no safetensors file holds"
                        f" a 4-bit weight ({QUANT_STATE}* tensors)")
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ModelError(f"{model_dir}: the stored 4-bit weights are incomplete or damaged ({len(problems)}"
                         f" problem(s)): {shown}. Download or copy the whole model again")


def _group_problems(weight: str, parts: dict[str, str], where: dict[str, tuple[Path, dict]],
                    stored: Stored4bit | None) -> list[str]:
    if weight not in where:
        return [f"{weight}: its packed 4-bit values are missing (only its quantization state is there)"]
    missing = [p for p in ("absmax", "quant_map") if p not in parts]
    file, entry = where[parts["quant_state"]]
    state = describe_state(_read_bytes(file, entry), f"{file.name}: {parts['quant_state']}")
    quant_type = parts["quant_state"].rpartition("__")[2]
    nested = "nested_blocksize" in state
    if nested:
        missing += [p for p in NESTED_PARTS if p not in parts]
    if missing:
        return [f"{weight}: {', '.join(f'.{p}' for p in missing)} missing"]
    problems = []
    if state.get("quant_type") != quant_type:
        problems.append(f"{weight}: its state says {state.get('quant_type')!r} in a tensor named for {quant_type!r}")
    if stored is not None and quant_type != stored.quant_type:
        problems.append(f"{weight} is stored in {quant_type}, config.json says {stored.quant_type}")
    n = math.prod(state["shape"])
    _, packed = where[weight]
    itemsize = ST_ITEMSIZE.get(packed["dtype"], 0)
    have = math.prod(packed["shape"]) * itemsize
    if not itemsize or have != packed_bytes(n, itemsize):
        problems.append(f"{weight}: {have} bytes of packed values for a {state['shape']} weight (needs"
                        f" {packed_bytes(n, max(itemsize, 1))})")
    blocks = math.ceil(n / max(state["blocksize"], 1))
    if math.prod(where[parts["absmax"]][1]["shape"]) != blocks:
        problems.append(f"{weight}.absmax holds {math.prod(where[parts['absmax']][1]['shape'])} scales, a"
                        f" {state['shape']} weight in blocks of {state['blocksize']} needs {blocks}")
    elif nested:
        nested_blocks = math.ceil(blocks / max(state["nested_blocksize"], 1))
        if math.prod(where[parts["nested_absmax"]][1]["shape"]) != nested_blocks:
            problems.append(f"{weight}.nested_absmax holds {math.prod(where[parts['nested_absmax']][1]['shape'])}"
                            f" scales where {nested_blocks} are needed")
    return problems


def _raw_header(file: Path) -> dict[str, dict]:
    """The JSON header of a safetensors file (modeling.check_safetensors_file has checked that it parses), with each
    entry's absolute data offset added."""
    with open(file, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    header.pop("__metadata__", None)
    for entry in header.values():
        entry["start"] = 8 + length + int(entry["data_offsets"][0])
        entry["end"] = 8 + length + int(entry["data_offsets"][1])
    return header


def _read_bytes(file: Path, entry: dict) -> bytes:
    with open(file, "rb") as fh:
        fh.seek(entry["start"])
        return fh.read(entry["end"] - entry["start"])


def dequantized_bytes(model_dir: Path, bytes_per_weight: int = 2) -> int:
    """Bytes of the checkpoint's tensors once its 4-bit weights are dequantized to `bytes_per_weight` (the merged
    model's size): 4-bit weights from their state's shape, the quantization state left out, the rest as stored."""
    total = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        header = _raw_header(file)
        parts = groups(header)
        skip = {k for g in parts.values() for name, k in g.items() if name != "weight"}
        for key, entry in header.items():
            if key in skip:
                continue
            if key in parts and parts[key]["quant_state"] in header:
                state = describe_state(_read_bytes(file, header[parts[key]["quant_state"]]), f"{file.name}: {key}")
                total += math.prod(state["shape"]) * bytes_per_weight
            else:
                total += entry["end"] - entry["start"]
    return total


# ------------------------------------------------------------------------------------------- tensors
def dequantize(key: str, tensors: Mapping[str, Any], device: str = "cpu"):
    """The weight one stored 4-bit weight holds, from its parts ({part name: tensor}, as `groups` names them), with
    bitsandbytes' own QuantState.from_dict and dequantize_4bit: what the 4-bit layer computes with, as float32."""
    import bitsandbytes.functional as bnbf
    import torch

    packed = tensors["weight"]
    stats = {name: t for name, t in tensors.items() if name != "weight"}
    stats[tensors_quant_state_key(tensors)] = stats.pop("quant_state")
    try:
        state = bnbf.QuantState.from_dict(stats, device=torch.device(device))
    except (ValueError, KeyError, AssertionError) as exc:
        raise ModelError(f"{key}: its 4-bit quantization state cannot be read ({exc}): download the model again"
                         ) from None
    n = math.prod(state.shape)
    if packed.numel() * packed.element_size() != packed_bytes(n, packed.element_size()):
        raise ModelError(f"{key}: {packed.numel() * packed.element_size()} bytes of packed 4-bit values for a"
                         f" {list(state.shape)} weight: the checkpoint is damaged; download it again")
    # In the state's own dtype, as the 4-bit layer dequantizes it for every matmul (a bf16 checkpoint's layer computes
    # with bf16-rounded weights), then float32 for adding the delta.
    return bnbf.dequantize_4bit(packed.to(device), state).to(torch.float32)


def tensors_quant_state_key(tensors: Mapping[str, Any]) -> str:
    """The name QuantState.from_dict wants for the packed JSON part: `quant_state.bitsandbytes__<type>`; the type is
    read from the JSON itself."""
    state = describe_state(tensors["quant_state"].cpu().numpy().tobytes(), "quant_state")
    return QUANT_STATE + str(state.get("quant_type"))


def quantize(weight, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64) -> dict[str, Any]:
    """One weight in the stored form: {suffix: tensor} with suffix "" for the packed uint8 values and ".absmax",
    ".quant_map", ... for its state, exactly as transformers' save_pretrained writes a bitsandbytes 4-bit layer
    (bitsandbytes' quantize_4bit + QuantState.as_dict(packed=True)). On the tensor's device."""
    import bitsandbytes.functional as bnbf
    import torch

    packed, state = bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant,
                                       quant_type=quant_type, quant_storage=torch.uint8)
    return {"": packed, **{"." + name: t for name, t in state.as_dict(packed=True).items()}}
