"""Read the records of a W&B offline run file (`run-*.wandb`): a LevelDB-style log of protobuf Records.

Layout: a 7-byte header (b":W&B", 2 magic bytes, 1 version byte), then 32 KiB blocks of chunks, each with
a 7-byte header (crc32c: 4 bytes, length: 2 bytes little-endian, type: 1 byte: 1 full, 2 first, 3 middle,
4 last). The payloads are `wandb_internal_pb2.Record` messages.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
FILE_HEADER = 7
CHUNK_HEADER = 7


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", FILE_HEADER
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if kind == 0 and length == 0:
            pos += left_in_block
            continue
        payload = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == 1:
            pending = payload
        elif kind == 2:
            pending = payload
            continue
        elif kind == 3:
            pending += payload
            continue
        elif kind == 4:
            pending += payload
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        records.append(record)
        pending = b""
    return records


def summarize(path: Path) -> dict:
    """-> {"config": {key: value}, "history": [{key: value}], "summary": {key: value}}"""
    out: dict = {"config": {}, "history": [], "summary": {}}
    for r in read_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":  # the config passed to wandb.init travels in the run record
            for item in r.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in r.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in r.history.item})
        elif kind == "summary":
            for item in r.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
