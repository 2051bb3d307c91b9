"""The benchmark's 4-bit checkpoint writer (entrypoints/bench/prequantize.py) against transformers' own save_pretrained.

    PYTHONPATH=$PWD python -m pytest tests/integration/test_benchmark_prequantize.py
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from entrypoints.bench import throughput  # noqa: E402

from ..results import tensors_of  # noqa: E402


def test_benchmark_writer_writes_what_transformers_saves(tiny_model, tiny_model_nf4, tmp_path):
    """entrypoints.bench.prequantize fed the tiny model's tensors writes the same tensors (bytes, dtypes, shapes) and
    the same quantization_config as transformers' save_pretrained of the model loaded in nf4."""
    from transformers import AutoConfig

    from entrypoints.bench import prequantize

    config = prequantize.stored_in_4bit(AutoConfig.from_pretrained(tiny_model))
    names, quantized = prequantize.skeleton(config)
    source = tensors_of(tiny_model)
    assert sorted(n for n, _ in names) == sorted(source)
    written = prequantize.write_prequantized(tmp_path / "ours", config, ((n, source[n]) for n, _ in names), quantized,
                                             max_shard_bytes=4 * 2**20)
    assert written["quantized"] == 14 and written["shards"] >= 2
    ours, theirs = tensors_of(tmp_path / "ours"), tensors_of(tiny_model_nf4)
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key
    ours_config = json.loads((tmp_path / "ours" / "config.json").read_text())
    their_config = json.loads((tiny_model_nf4 / "config.json").read_text())
    assert ours_config["quantization_config"] == their_config["quantization_config"]
    assert {k: v for k, v in ours_config.items() if k != "quantization_config"} == \
        {k: v for k, v in their_config.items() if k != "quantization_config"}


def test_prequantized_choice(tmp_path):
    """`--prequantized auto` writes 4 bits only when the 16-bit checkpoint would not fit the free disk."""
    assert throughput.wants_prequantized("true", "tiny", tmp_path)
    assert not throughput.wants_prequantized("false", "70b", tmp_path)
    assert not throughput.wants_prequantized("auto", "tiny", tmp_path / "not-yet")  # 8 MB fit anywhere


def test_random_checkpoint_loads_through_the_jobs_prequantized_path(tmp_path):
    """The benchmark's random 4-bit checkpoint (tiny shape, CPU) passes the job's checks and loads as stored."""
    from entrypoints import modeling
    from entrypoints.bench import prequantize
    from entrypoints.config import parse_config

    built = prequantize.build("tiny", tmp_path / "m", "cpu")
    assert built["quantized"] == 14 and built["form"] == "bitsandbytes nf4, double quantization on"
    modeling.check_model_dir(tmp_path / "m", allow_pickle=False)
    cfg = modeling.settings_for_checkpoint(
        parse_config({}, ["--model", str(tmp_path / "m"), "--data", "x.jsonl"], check_paths=False), tmp_path / "m")
    model = modeling.load_model(tmp_path / "m", cfg)
    assert sum(type(m).__name__ == "Linear4bit" for m in model.modules()) == 14
