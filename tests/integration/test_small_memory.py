"""The small-memory plan's choices reach the real trainer: the 8-bit AdamW the plan picks trains the tiny model on CPU
(bitsandbytes' own 8-bit optimizer, its moments in uint8). Activation offload is CUDA-only (TRL's offloading copies to
an accelerator): sft_config leaves it off on CPU, and tests/gpu/test_gpu.py checks it on a GPU.

    PYTHONPATH=$PWD python -m pytest tests/integration/test_small_memory.py
"""

from __future__ import annotations

from dataclasses import replace

from entrypoints import sizing


def test_the_plans_8bit_optimizer_reaches_the_trainer_and_trains(tiny_model, tmp_path):
    import bitsandbytes as bnb
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    from entrypoints import modeling
    from entrypoints.bench import throughput as benchmark
    from entrypoints.checkpoints import StopFlag
    from entrypoints.dataset import TokenizedData
    from entrypoints.tracking import NullTracker
    from entrypoints.trainer import build_trainer

    # The plan the job makes for 7B under a 5.2 GiB cap (torch-free), scaled down to rows the tiny model trains on.
    planned = sizing.plan_batch(replace(sizing.PlanSettings(), capped=True), int(5.2 * sizing.GIB),
                                sizing.SHAPES["7b"], mean_sample_tokens=412)
    assert planned.optim == "adamw_8bit" and planned.activation_offload and planned.fits
    plan = replace(planned, rows=2, row_tokens=64, micro_batch_tokens=128, gradient_accumulation_steps=1)

    cfg = benchmark.job_config(tiny_model, tmp_path, 64, 0, {"max_steps": "3", "learning_rate": "1e-3",
                                                                 "lora_r": "64"})
    model = modeling.load_model(tiny_model, cfg, 0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    data = benchmark.synthetic_chat(16, 32000, 64, seed=0)
    trainer = build_trainer(cfg, model, tokenizer, TokenizedData(Dataset.from_dict(data), None, []), NullTracker(),
                            StopFlag(), plan, {})
    assert str(trainer.args.optim.value) == "adamw_8bit" and trainer.args.activation_offloading is False
    result = trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    assert isinstance(optimizer, bnb.optim.AdamW)  # transformers' adamw_8bit: bitsandbytes' AdamW, optim_bits=8
    assert optimizer.args.optim_bits == 8
    # bitsandbytes keeps tensors under 4096 elements in 32 bits; r=64 makes the LoRA A matrices (64 x 64) that large.
    large = [s for p, s in optimizer.state.items() if p.numel() >= optimizer.args.min_8bit_size]
    assert large and all(s["state1"].dtype == s["state2"].dtype == torch.uint8 for s in large)
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # the 8-bit steps changed the adapter
