"""Safetensors files read and written without holding more than one tensor: headers, single tensors, atomic writes.

A header is 8 bytes of length and a JSON table of every tensor's dtype, shape and byte range; a tensor is read
with plain file reads at its offset (no mmap, so the resident set never grows with the file), and a file is
written tensor by tensor from a header computed first, to a temporary name renamed when complete.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from entrypoints.errors import ModelError

HEADER_LIMIT_BYTES = 100 * 1024 * 1024


def _st_dtypes():
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    }

@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a local safetensors file."""

    path: Path
    dtype: object  # torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file, from its header alone (a few KB are read)."""
    dtypes = _st_dtypes()
    fix = f"re-download or re-save {path.name} (save_pretrained writes valid safetensors)"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > HEADER_LIMIT_BYTES or 8 + header_len > size:
                raise ValueError(f"header length {header_len} does not fit a {size}-byte file")
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, ValueError) as exc:
        raise ModelError(f"{path} is not a valid safetensors file ({exc}): {fix}") from None
    data_start = 8 + header_len
    tensors = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = dtypes[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path}: tensor {key!r} has a malformed or unsupported header entry {entry!r}: {fix}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or data_start + end > size:
            raise ModelError(f"{path}: tensor {key!r} ({entry['dtype']} {list(shape)}) does not fit its byte range"
                             f" {begin}..{end} of a {size}-byte file (truncated download?): {fix}")
        tensors[key] = TensorInfo(path, dtype, shape, data_start + begin, nbytes)
    return tensors


def read_tensor(info: TensorInfo):
    """Read one tensor with plain file reads: nothing stays mapped, so resident memory is this tensor only."""
    import torch

    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    with open(info.path, "rb", buffering=0) as f:
        f.seek(info.offset)
        done = 0
        while done < info.nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise ModelError(f"{info.path} ended early while reading a tensor: re-download the file")
            done += n
    return buf.view(info.dtype).reshape(info.shape)


def write_safetensors(path: Path, entries: list[tuple[str, object, tuple[int, ...]]],
                      produce: Callable[[str], object]) -> int:
    """Write a safetensors file whose tensors are produced one at a time, atomically (tmp + rename).

    The header is computed from the (key, dtype, shape) entries first, so no more than one tensor is ever
    held. Returns the number of bytes of tensor data.
    """
    names = {v: k for k, v in _st_dtypes().items()}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, dtype, shape in entries:
            tensor = produce(key)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise AssertionError(f"{key}: produced {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {shape}")
            f.write(memoryview(tensor.contiguous().reshape(-1).view(dtype=_u8()).numpy()))
            del tensor
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return offset


def _u8():
    import torch

    return torch.uint8

def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
