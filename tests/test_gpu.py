"""GPU tests: the 4-bit loading path, the packed (varlen) path and the multi-GPU launch, on CUDA only.

    PYTHONPATH=$PWD python -m pytest -m gpu tests/test_gpu.py -v      # skipped without CUDA
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    import torch

    from entrypoints import benchmark

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    d = tmp_path_factory.mktemp("small-llama")
    benchmark.build_checkpoint("tiny", d, "cuda")
    return d


def _cfg(model_dir, tmp_path, **settings):
    from entrypoints.benchmark import job_config

    return job_config(model_dir, tmp_path, 256, 0, settings)


def test_4bit_path_loads_nf4_with_bf16_storage_and_trains(small_model, tmp_path):
    import bitsandbytes as bnb
    import torch

    from entrypoints.modeling import load_model

    cfg = _cfg(small_model, tmp_path)
    model = load_model(small_model, cfg, 0)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit)
    assert q.weight.quant_type == "nf4" and q.weight.quant_storage == torch.bfloat16  # FSDP can shard it
    assert q.compute_dtype == torch.bfloat16 and q.weight.device.type == "cuda"
    assert model.config._attn_implementation == "qlora_varlen"  # packing is on by default


def test_packed_varlen_forward_matches_separate_samples_on_gpu():
    """Flash varlen kernel over a packed row == each sample alone through SDPA (bf16 tolerance)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from entrypoints import perf

    perf.register_varlen_attention()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).cuda().to(torch.bfloat16).eval()
    lengths = [37, 300, 5, 129]
    samples = [torch.randint(3, 1000, (n,), device="cuda") for n in lengths]
    with torch.no_grad():
        alone = torch.cat([model(input_ids=s[None]).logits[0].float() for s in samples])
        model.config._attn_implementation = perf.VARLEN_ATTENTION
        ids = torch.cat(samples)[None]
        pos = torch.cat([torch.arange(n, device="cuda") for n in lengths])[None]
        cu = torch.tensor([0, 37, 337, 342, 471], dtype=torch.int32, device="cuda")
        packed = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=300,
                       max_length_k=300).logits[0].float()
    rel = (packed - alone).norm() / alone.norm()
    assert rel < 1e-2, f"relative error {rel:.2e}"


def test_job_default_path_trains_packed(tmp_path):
    """The job's default path (load_model + build_trainer) trains packed, varlen, fused AdamW, finite losses.

    Runs in a child process on the first GPU: one process seeing several GPUs is refused by SFTTrainer
    (nn.DataParallel); multi-GPU training goes through torchrun (next test)."""
    out = tmp_path / "one.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "entrypoints.benchmark", "--shape", "tiny", "--runs", "default", "--samples", "64",
         "--max-length", "256", "--out", str(out)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads(out.read_text())["runs"][0]
    plan = run["plan"]
    assert plan["packing"] and plan["attn_implementation"] == "qlora_varlen" and "fused" in plan["optim"].lower()
    assert 0 < run["loss_last"] < 20 and run["tokens"] == json.loads(out.read_text())["data"]["train_tokens"]


def test_multi_gpu_launch_ddp(tmp_path):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    out = tmp_path / "ddp.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "entrypoints.benchmark", "--shape", "tiny", "--runs", "default", "--samples", "64", "--max-length", "256",
         "--model-dir", str(tmp_path / "model"), "--out", str(out)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    run = report["runs"][0]
    assert report["world_size"] == 2 and run["world_size"] == 2
    # the two ranks together saw every sample once (the sampler may repeat a row to even the shards)
    assert run["tokens"] >= report["data"]["train_tokens"]
