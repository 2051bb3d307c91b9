"""The merge benchmark's pieces: the random checkpoint it builds loads and merges; the 70B memory bound.

    PYTHONPATH=$PWD python -m pytest tests/integration/test_merge_benchmark.py
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
from entrypoints.bench import merge_memory as mb  # noqa: E402
from entrypoints.merge import merge_adapter  # noqa: E402


def test_tiny_checkpoint_merges_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    info = mb.build_checkpoint(mb.SHAPES["tiny"], tmp_path / "base", tmp_path / "adapter")
    index = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())
    assert info["shards"] == 2 and len(set(index["weight_map"].values())) == 2
    summary = merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert summary["lora_modules_merged"] == 2 * 7
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.hidden_size == mb.SHAPES["tiny"].hidden_size


def test_70b_peak_fits_a_g5_2xlarge():
    plan = mb.plan_peak(mb.SHAPES["70b"], runtime_bytes=0.44e9)
    assert 68e9 < plan["params"] < 70e9
    assert plan["largest_tensor_bytes"] == 32000 * 8192 * 2
    assert plan["peak_estimate_bytes"] < plan["peak_shard_bound_bytes"] < mb.G5_2XLARGE_RAM_BYTES
    assert plan["peft_needs_at_least_bytes"] > 4 * mb.G5_2XLARGE_RAM_BYTES


def test_plan_only_prints_units_in_its_keys(capsys):
    """--plan-only printed GB values under keys named `..._bytes`: every printed key now names its unit."""
    assert mb.main(["--shape", "70b", "--plan-only", "--runtime-gb", "0.44"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["units"] == "GB = 10^9 bytes" and not [k for k in report if k.endswith("_bytes")]
    plan = mb.plan_peak(mb.SHAPES["70b"], runtime_bytes=0.44e9)
    assert report["peak_estimate_gb"] == round(plan["peak_estimate_bytes"] / 1e9, 2) == 2.98
    assert report["checkpoint_gb"] == 137.95 and report["g5_2xlarge_ram_gb"] == 34.36 and report["fits_g5_2xlarge"]
