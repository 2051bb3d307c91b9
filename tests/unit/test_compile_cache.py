"""The compile cache's file, key and refusals, in this process (no compilation: the round trip across processes is
tests/integration/test_compile_cache.py). Whatever is wrong with an artifact, loading it is at most one log line and
`False`: the job then compiles from scratch, it never fails for its cache."""

from __future__ import annotations

import logging

import pytest

from entrypoints import compile_cache
from entrypoints.compile_cache import CHECKPOINT_FILE, CompileCache, cache_key, decode, encode

TRAINING = {"lora": "r=16 alpha=32 dropout=0.0 targets=all-linear", "attention": "sdpa", "activation_offload": False,
            "fsdp": False}


def _parts(**changes):
    parts = compile_cache.key_parts({"model_type": "llama", "hidden_size": 64}, "bfloat16", [2, 3], TRAINING)
    return {**parts, **changes}


def _checkpoint(tmp_path, data: bytes):
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / CHECKPOINT_FILE).write_bytes(data)
    return checkpoint


def _records(caplog, level=logging.INFO):
    return [r for r in caplog.records if r.levelno >= level]


def test_the_key_changes_with_every_part_and_names_this_machine():
    parts = _parts()
    assert parts["recomputed_layers"] == "2-3" and parts["compute_dtype"] == "bfloat16"
    assert parts["torch"] and parts["device"].startswith(("cpu", "NVIDIA")) and len(parts["model_config_sha256"]) == 16
    assert len(cache_key(parts)) == 16 and cache_key(parts) == cache_key(dict(reversed(list(parts.items()))))
    for name, other in [("device", "NVIDIA H100 80GB HBM3 (compute capability 9.0)"), ("torch", "2.99.0"),
                        ("recomputed_layers", "none"), ("lora", "r=8"), ("compute_dtype", "float16")]:
        assert cache_key({**parts, name: other}) != cache_key(parts), name
    # Where the model was loaded from does not change its kernels; its architecture does.
    same = compile_cache.key_parts({"model_type": "llama", "hidden_size": 64, "_name_or_path": "/tmp/x"}, "bfloat16",
                                   [2, 3], TRAINING)
    wider = compile_cache.key_parts({"model_type": "llama", "hidden_size": 128}, "bfloat16", [2, 3], TRAINING)
    assert cache_key(same) == cache_key(parts) != cache_key(wider)
    assert compile_cache._ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and compile_cache._ranges([]) == "none"


def test_the_file_round_trips_and_a_damaged_one_is_named_as_such():
    data = encode(b"payload bytes", _parts(), {"inductor": 2})
    header, payload = decode(data)
    assert payload == b"payload bytes" and header["key"] == cache_key(_parts()) and header["artifacts"] == {"inductor": 2}
    for broken, why in [(data[:-3], "do not match"), (data[:len(compile_cache.MAGIC) + 20], "cut off"), (b"PK\x03\x04 a zip", "does not start"),
                        (data.replace(b'"payload_bytes": 13', b'"payload_bytes": "x"'), "header cannot be read")]:
        with pytest.raises(compile_cache.DamagedCache, match=why):
            decode(broken)


def test_a_truncated_artifact_is_one_warning_and_not_loaded(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    checkpoint = _checkpoint(tmp_path, encode(b"x" * 1000, _parts(), {"inductor": 1})[:-100])
    cache = CompileCache("auto", _parts())
    assert cache.load(checkpoint) is False and cache.record()["loaded"] is False
    records = _records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.WARNING, [r.getMessage() for r in records]
    assert records[0].getMessage().startswith(f"compile cache: {checkpoint / CHECKPOINT_FILE} is damaged (its content"
                                              " is 900 bytes that do not match the 1,000 bytes")
    assert records[0].getMessage().endswith("compiling from scratch")


def test_an_artifact_torch_cannot_load_is_one_warning_and_not_loaded(tmp_path, caplog):
    """A whole file (its checksum matches) whose payload torch cannot deserialize: torch's own traceback is kept out of
    the log, the job says it in one line."""
    caplog.set_level(logging.INFO)
    checkpoint = _checkpoint(tmp_path, encode(b"\x00\x01 not torch's serialization", _parts(), {"inductor": 1}))
    assert CompileCache("auto", _parts()).load(checkpoint) is False
    records = _records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.WARNING, [r.getMessage() for r in records]
    assert "compile cache: torch could not load" in records[0].getMessage()
    assert not records[0].exc_info


def test_an_artifact_of_another_setup_is_not_loaded_and_the_log_says_what_differs(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    theirs = _parts(device="NVIDIA A10G (compute capability 8.6)", torch="2.10.0+cu128")
    checkpoint = _checkpoint(tmp_path, encode(b"never handed to torch", theirs, {"inductor": 1}))
    here = _parts()
    assert CompileCache("auto", here).load(checkpoint) is False
    records = _records(caplog)
    assert [r.levelno for r in records] == [logging.INFO]
    message = records[0].getMessage()
    assert message.startswith(f"compile cache: {checkpoint / CHECKPOINT_FILE} not loaded: it was made for another setup")
    assert "device: 'NVIDIA A10G (compute capability 8.6)' there, " in message and "torch: '2.10.0+cu128' there, " in message
    assert "lora" not in message  # only what differs


def test_a_store_without_this_key_and_a_checkpoint_without_a_cache_are_info_lines(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    store = tmp_path / "store"
    cache = CompileCache(str(store), _parts())
    assert cache.store_uri == str(store / f"torch-compile-{cache.key}.bin")
    assert cache.load(checkpoint) is False
    assert [r.getMessage() for r in _records(caplog)] == [
        f"compile cache: none in {checkpoint} (it was saved without one)",
        f"compile cache: none for this key ({cache.key}) at {cache.store_uri}"]
    assert CompileCache("auto", _parts()).store_uri is None


def test_an_unreadable_store_is_one_warning(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cache = CompileCache(str(tmp_path / ("x" * 300)), _parts())  # a name longer than the file system allows
    assert cache.load(None) is False
    records = _records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert records[0].getMessage().startswith(f"compile cache: could not read {cache.store_uri} (")
