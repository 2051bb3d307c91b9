"""GPU tests: the 4-bit loading path, the packed (varlen) path and the multi-GPU launch, on CUDA only.

    PYTHONPATH=$PWD python -m pytest -m gpu tests/gpu/test_gpu.py -v      # skipped without CUDA
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    import torch

    from entrypoints.bench import throughput as benchmark

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    d = tmp_path_factory.mktemp("small-llama")
    benchmark.build_checkpoint("tiny", d, "cuda")
    return d


def _cfg(model_dir, tmp_path, **settings):
    from entrypoints.bench.throughput import job_config

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


def test_activation_offload_under_checkpointing_keeps_gradients_and_frees_gpu_memory():
    """TRL's activation offloading (what the small-memory plan switches on) around a checkpointed model: the
    checkpointed layer inputs wait in CPU memory, the gradients are those of plain checkpointing, and the peak
    GPU memory of the forward/backward is lower."""
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.models import get_act_offloading_ctx_manager

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=8192)
    reference = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    again, offloaded = copy.deepcopy(reference), copy.deepcopy(reference)
    ids = torch.randint(0, 1024, (1, 8192), device="cuda")
    grads, peaks = [], []
    for model, offload in ((reference, False), (again, False), (offloaded, True)):
        # As in QLoRA, the big weights are frozen (their gradients would otherwise dominate the peak): only the
        # norms train here, so the peak is the activations'.
        for name, param in model.named_parameters():
            param.requires_grad_("norm" in name)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        context = get_act_offloading_ctx_manager(model) if offload else None
        for _ in range(2):  # the second pass is measured (the first allocates the side stream's buffers)
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            if context is not None:
                with context:
                    model(input_ids=ids, labels=ids).loss.backward()
            else:
                model(input_ids=ids, labels=ids).loss.backward()
            torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        grads.append(torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad]))
    # bf16 backward passes differ run to run (the order of atomic adds): offload may differ from plain checkpointing
    # by no more than two plain runs differ from each other (with a floor for a bit-exact GPU).
    noise = (grads[0] - grads[1]).norm()
    offload_diff = (grads[0] - grads[2]).norm()
    print(f"gradient norm {grads[0].norm():.4f}, plain vs plain {noise:.5f}, plain vs offloaded {offload_diff:.5f}")
    assert offload_diff <= max(3 * noise, 1e-3 * grads[0].norm()), (float(noise), float(offload_diff))
    peaks = [peaks[0], peaks[2]]
    # 16 layer inputs of 8192 x 1024 bf16 (16 MiB each) leave the GPU but for the few in flight.
    assert peaks[1] < peaks[0] - 100 * 2**20, peaks


def test_job_default_path_trains_packed(tmp_path):
    """The job's default path (load_model + build_trainer) trains packed, varlen, fused AdamW, finite losses.

    Runs in a child process on the first GPU: one process seeing several GPUs is refused by SFTTrainer
    (nn.DataParallel); multi-GPU training goes through torchrun (next test)."""
    out = tmp_path / "one.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "entrypoints.bench.throughput", "--shape", "tiny", "--runs", "default", "--samples", "64",
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
         "entrypoints.bench.throughput", "--shape", "tiny", "--runs", "default", "--samples", "64", "--max-length", "256",
         "--model-dir", str(tmp_path / "model"), "--out", str(out)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    run = report["runs"][0]
    assert report["world_size"] == 2 and run["world_size"] == 2
    # the two ranks together saw every sample once (the sampler may repeat a row to even the shards)
    assert run["tokens"] >= report["data"]["train_tokens"]


def test_two_gpus_through_the_container_entrypoint_match_one_gpu(small_model):
    """`container/entrypoint.py train` (torchrun, one process per visible GPU) on 2 GPUs against the same job on
    CUDA_VISIBLE_DEVICES=<first GPU>: one output of the same format, one W&B run, rank 1 reusing rank 0's work.

    As root the entrypoint drops to uid 1000 like the image does, so the job's code, model, data and outputs live
    in one world-writable folder under /tmp, and every cache a library keeps below HOME is pointed there too."""
    import importlib.util
    import shutil
    import tempfile

    import torch

    from ..integration.test_distributed import SUMMARY_PREFIX, output_format, rank_lines

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    as_root = os.geteuid() == 0
    if as_root and shutil.which("setpriv") is None:
        pytest.fail("as root the entrypoint drops to uid 1000 with setpriv (util-linux), which this machine lacks")
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()] or ["0", "1"]
    has_wandb = importlib.util.find_spec("wandb") is not None
    root = Path(tempfile.mkdtemp(prefix="qlora-2gpu-", dir="/tmp"))
    try:
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(REPO / "entrypoints", root / "repo" / "entrypoints", ignore=ignore)
        shutil.copytree(REPO / "container", root / "repo" / "container", ignore=ignore)
        shutil.copytree(small_model, root / "model")
        data = root / "train.jsonl"
        # Plain text over the benchmark tokenizer's words (t3..t31999); that tokenizer has no chat template.
        data.write_text("".join(json.dumps({"text": " ".join(f"t{(i * 7 + j * 13) % 997 + 3}" for j in range(48))})
                                + "\n" for i in range(64)))
        for name in ("one", "two", "cache"):
            (root / name).mkdir()
        for path in [root, *root.rglob("*")]:
            path.chmod(0o777 if path.is_dir() else 0o644)

        def run(name: str, devices: list[str]) -> tuple[int, str]:
            env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_") and k not in (
                "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "NNODES")}
            cache = root / "cache"
            env.update({
                "PYTHONPATH": os.pathsep.join([str(root / "repo"), os.environ.get("PYTHONPATH", "")]),
                "CUDA_VISIBLE_DEVICES": ",".join(devices),
                "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(root / name),
                "WANDB_CONFIG_DIR": str(cache / "wandb-config"), "WANDB_CACHE_DIR": str(cache / "wandb"),
                "XDG_CACHE_HOME": str(cache), "XDG_CONFIG_HOME": str(cache / "config"), "HF_HOME": str(cache / "hf"),
                "TRITON_HOME": str(cache), "TRITON_CACHE_DIR": str(cache / "triton"),
                "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "MPLCONFIGDIR": str(cache / "mpl"),
                "QLORA_BASE_DIR": str(root / name / "opt-ml"), "QLORA_OUTPUT": str(root / name / "out"),
                "QLORA_MODEL": str(root / "model"), "QLORA_DATA": str(data), "QLORA_DATA_FORMAT": "text",
                "QLORA_MAX_SEQ_LENGTH": "256", "QLORA_MAX_STEPS": "3", "QLORA_MICRO_BATCH_SIZE": "2",
                "QLORA_GRADIENT_ACCUMULATION_STEPS": "1", "QLORA_EVAL_FRACTION": "0.25", "QLORA_LOGGING_STEPS": "1",
                "QLORA_SAVE_STEPS": "2", "QLORA_LORA_R": "8", "QLORA_LORA_ALPHA": "16",
                "QLORA_REPORT_TO": "auto" if has_wandb else "none",
            })
            proc = subprocess.run([sys.executable, str(root / "repo" / "container" / "entrypoint.py"), "train"],
                                  env=env, cwd=root / "repo", capture_output=True, text=True, timeout=600)
            return proc.returncode, proc.stdout + proc.stderr

        code, one_log = run("one", visible[:1])
        assert code == 0, one_log[-5000:]
        assert "torch.distributed.run" not in one_log  # one GPU: the job runs directly
        code, two_log = run("two", visible[:2])
        assert code == 0, two_log[-6000:]
        assert "torch.distributed.run" in two_log and "--nproc-per-node=2" in two_log, two_log[-3000:]
        assert "rank 1 of 2 (local rank 1, backend nccl)" in two_log, two_log[-3000:]
        # torch.compile is on by default where Triton can build its launcher: eval, sample answers, DDP and the
        # merge all ran with compiled layers, and nothing had to fall back.
        from entrypoints import perf

        if perf.compiler_available():
            assert "torch.compile: " in one_log and "torch.compile: " in two_log, two_log[-3000:]
            assert "could not compile" not in one_log + two_log

        lines = two_log.splitlines()
        assert sum(line.startswith(SUMMARY_PREFIX) for line in lines) == 1
        summary = json.loads(next(x for x in lines if x.startswith(SUMMARY_PREFIX))[len(SUMMARY_PREFIX):])
        assert summary["device"] == "cuda" and summary["global_step"] == 3
        assert sorted(str(p.relative_to(root / "two")) for p in (root / "two").rglob("manifest.json")) == [
            "opt-ml/work/output/manifest.json", "out/manifest.json"]
        one, two = output_format(root / "one" / "out"), output_format(root / "two" / "out")
        assert two["files"] == one["files"] and "adapter/adapter_model.safetensors" in two["files"]
        assert any(f.startswith("merged/") and f.endswith(".safetensors") for f in two["files"])
        for key in ("tensors", "adapter_config", "merged_config", "generation_config", "settings", "steps", "records"):
            assert two[key] == one[key], key

        rank1 = "\n".join(rank_lines(two_log, 1))
        assert "waiting for rank 0: the input downloads" in rank1 and "data: reused the Arrow caches" in rank1
        assert "W&B run" not in rank1
        if has_wandb:
            assert len(list((root / "two").rglob("offline-run-*/run-*.wandb"))) == 1
            assert len(list((root / "one").rglob("offline-run-*/run-*.wandb"))) == 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_auto_generation_batch_follows_the_free_memory_and_the_cap():
    """generation_batch_size=0: the whole GPU gives the largest batch; a per-process cap just above what is allocated
    gives a smaller one, never 0."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from entrypoints.evaluation import MAX_AUTO_GENERATION_BATCH, auto_generation_batch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=4,
                         num_attention_heads=32, num_key_value_heads=32)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    assert auto_generation_batch(model, 512, 128) == MAX_AUTO_GENERATION_BATCH
    total = torch.cuda.get_device_properties(0).total_memory
    try:
        # 2 GiB above what is allocated: half of it over ~0.13 GiB a row (4 layers' KV cache over 640 tokens, the
        # prefill of 512 tokens, the logits) leaves room for about 7 rows
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + 2 * 2**30) / total)
        capped = auto_generation_batch(model, 512, 128)
        torch.cuda.set_per_process_memory_fraction(torch.cuda.memory_allocated() / total)
        none_left = auto_generation_batch(model, 512, 128)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert 1 <= capped < MAX_AUTO_GENERATION_BATCH and none_left == 1, (capped, none_left)
