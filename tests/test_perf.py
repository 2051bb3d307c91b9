"""Unit tests of the fast path's decisions and of the benchmark, on CPU.

    PYTHONPATH=$PWD python -m pytest tests/test_perf.py
"""

from __future__ import annotations

import json
import statistics

import pytest

from entrypoints import perf, sizing
from entrypoints.bench import throughput as benchmark
from entrypoints.config import JobConfig
from entrypoints.trainer import sft_config

GIB = sizing.GIB


def test_matmul_params_match_llama2_7b_and_13b():
    # Llama-2-7B has 6.74e9 parameters, of which 2 x 131M are the embedding and the LM head.
    n7 = sizing.matmul_params(sizing.SHAPES["7b"])
    assert abs(n7 + 4096 * 32000 - 6.738e9) / 6.738e9 < 0.002
    n13 = sizing.matmul_params(sizing.SHAPES["13b"])
    assert abs(n13 + 5120 * 32000 - 13.016e9) / 13.016e9 < 0.002
    # 70B uses grouped-query attention: 8 key/value heads of 64.
    n70 = sizing.matmul_params(sizing.SHAPES["70b"])
    assert abs(n70 + 8192 * 32000 - 68.977e9) / 68.977e9 < 0.002


def test_flops_per_token_formula():
    shape = sizing.SHAPES["7b"]
    flops = sizing.train_flops_per_token(shape, 16, attended_keys=0.0)
    assert flops == 4 * sizing.matmul_params(shape) + 6 * sizing.lora_params(shape, 16)
    # LoRA r=16 on all linear layers of 7B: 40M parameters.
    assert abs(sizing.lora_params(shape, 16) - 39.98e6) / 39.98e6 < 0.01
    with_attention = sizing.train_flops_per_token(shape, 16, attended_keys=1000.0)
    assert with_attention - flops == 12 * 32 * 4096 * 1000.0


def test_mean_attended_keys_is_causal_average():
    assert sizing.mean_attended_keys([1]) == 1.0
    assert sizing.mean_attended_keys([4]) == (1 + 2 + 3 + 4) / 4
    assert sizing.mean_attended_keys([4, 2]) == (10 + 3) / 6


def _cfg(**kw):
    return JobConfig(data="x", **kw)


def _plan(**kw):
    return sizing.PlanSettings.of(_cfg(**kw))


def test_plan_keeps_tokens_per_step_of_the_unpacked_recipe():
    plan = sizing.plan_batch(_plan(), 80 * GIB, sizing.SHAPES["7b"], mean_sample_tokens=400)
    step_tokens = 4 * 4 * 400  # micro_batch_size x gradient_accumulation_steps x mean length
    assert plan.rows * 2048 * plan.gradient_accumulation_steps == pytest.approx(step_tokens, rel=0.35)
    assert plan.micro_batch_tokens == plan.rows * 2048


def test_a_step_smaller_than_a_row_packs_shorter_rows_instead_of_one_full_row():
    """76 short samples (~23 tokens) with the defaults made ONE step of a full 2048-token row: the step is
    micro_batch_size x accumulation x mean sample = 368 tokens, so a row is one step long (never shorter than the
    longest sample, so packing cuts nothing that max_seq_length keeps)."""
    seven = sizing.SHAPES["7b"]
    for on_gpu in (True, False):
        plan = sizing.plan_batch(_plan(), 80 * GIB, seven, mean_sample_tokens=23, on_gpu=on_gpu, longest_sample_tokens=27)
        assert (plan.row_tokens, plan.rows, plan.gradient_accumulation_steps) == (368, 1, 1)
        assert "packed rows of 368 tokens" in plan.reason
    long_tail = sizing.plan_batch(_plan(), 80 * GIB, seven, mean_sample_tokens=23, longest_sample_tokens=900)
    assert long_tail.row_tokens == 900  # one sample of 900 tokens must fit a row whole
    unknown = sizing.plan_batch(_plan(), 80 * GIB, seven, mean_sample_tokens=23)
    assert unknown.row_tokens == 2048  # without the longest sample's length: full rows, as before
    big_steps = sizing.plan_batch(_plan(), 80 * GIB, seven, mean_sample_tokens=400, longest_sample_tokens=1500)
    assert big_steps.row_tokens == 2048  # a step of 6400 tokens: rows of max_seq_length
    assert sft_config(_cfg(), plan, cuda=False, precision="bfloat16", has_eval=False, report_to="none")["max_length"] == 368


def test_auto_checkpointing_spends_spare_memory_on_layers_that_keep_activations():
    seven = sizing.SHAPES["7b"]
    # 80 GB: every layer of 7B fits without recomputation, so checkpointing is switched off.
    big = sizing.plan_batch(_plan(), 80 * GIB, seven, mean_sample_tokens=400)
    assert big.gradient_checkpointing is False and big.layers_without_checkpointing == 32
    # A 24 GB card: some layers kept, the rest recomputed; the estimate stays inside 80% of the card.
    small = sizing.plan_batch(_plan(lora_dropout=0.05), 22 * GIB, seven, mean_sample_tokens=400)
    assert small.gradient_checkpointing is True and 0 < small.layers_without_checkpointing < 32
    estimate = (sizing.fixed_bytes(seven, _plan(lora_dropout=0.05)) + small.micro_batch_tokens * sizing.activation_bytes_per_token(seven, True)
                + small.layers_without_checkpointing * small.micro_batch_tokens
                * sizing.layer_bytes_per_token(seven, lora_dropout=True))
    assert estimate <= sizing.MEMORY_SHARE * 22 * GIB
    # Without LoRA dropout a kept layer is cheaper, so at least as many fit.
    no_dropout = sizing.plan_batch(_plan(lora_dropout=0.0), 22 * GIB, seven, mean_sample_tokens=400)
    assert no_dropout.layers_without_checkpointing > small.layers_without_checkpointing
    # Nothing spare: every layer recomputed.
    tight = sizing.plan_batch(_plan(), 8 * GIB, seven, mean_sample_tokens=400)
    assert tight.gradient_checkpointing is True and tight.layers_without_checkpointing == 0


def test_forced_checkpointing_and_cpu_keep_every_layer_recomputed():
    seven = sizing.SHAPES["7b"]
    forced = sizing.plan_batch(_plan(gradient_checkpointing="true"), 80 * GIB, seven, mean_sample_tokens=400)
    assert forced.gradient_checkpointing is True and forced.layers_without_checkpointing == 0
    off = sizing.plan_batch(_plan(gradient_checkpointing="false"), 22 * GIB, seven, mean_sample_tokens=400)
    assert off.gradient_checkpointing is False and off.layers_without_checkpointing == 32
    # `false` sizes the micro-batch for activations of every layer: smaller than with recomputation.
    assert off.micro_batch_tokens <= forced.micro_batch_tokens
    cpu = sizing.plan_batch(_plan(), 1 << 50, seven, mean_sample_tokens=400, on_gpu=False)
    assert cpu.gradient_checkpointing is True and cpu.layers_without_checkpointing == 0


def test_layer_memory_model_matches_the_measured_7b_numbers():
    # PERF.md (H200, 2026-11-28): every layer kept vs every layer recomputed, 6,144-token micro-batches:
    # 41.25 GiB vs 7.08 allocated with LoRA dropout 0.05, 28.77 GiB vs 7.08 without.
    for dropout, kept_gib in ((True, 41.25), (False, 28.77)):
        measured = (kept_gib - 7.08) * GIB / 32 / 6144
        model = sizing.layer_bytes_per_token(sizing.SHAPES["7b"], lora_dropout=dropout)
        assert measured <= model <= 1.2 * measured, (dropout, measured, model)


def test_plan_shrinks_micro_batch_on_small_gpus_and_accumulates():
    big = sizing.plan_batch(_plan(micro_batch_size=8), 80 * GIB, sizing.SHAPES["13b"], mean_sample_tokens=1000)
    small = sizing.plan_batch(_plan(micro_batch_size=8), 22 * GIB, sizing.SHAPES["13b"], mean_sample_tokens=1000)
    assert small.micro_batch_tokens < big.micro_batch_tokens
    assert small.gradient_accumulation_steps > big.gradient_accumulation_steps
    # never less than one row of max_seq_length, even when nothing fits
    tiny_gpu = sizing.plan_batch(_plan(), 4 * GIB, sizing.SHAPES["13b"], mean_sample_tokens=300)
    assert tiny_gpu.rows == 1


def test_plan_override():
    plan = sizing.plan_batch(_plan(micro_batch_tokens=16384), 80 * GIB, sizing.SHAPES["7b"], mean_sample_tokens=400)
    assert plan.rows == 8 and plan.micro_batch_tokens == 16384 and plan.gradient_accumulation_steps == 1


def _sft(cfg, plan, cuda):
    return sft_config(cfg, plan, cuda=cuda, precision="bfloat16", has_eval=False, report_to="none")


def test_the_sft_config_is_decided_once():
    plan = sizing.plan_batch(_plan(), 80 * GIB, sizing.SHAPES["7b"], mean_sample_tokens=400)
    out = _sft(_cfg(), plan, cuda=False)
    assert out["packing"] and out["padding_free"] and out["packing_strategy"] == "bfd"
    assert (out["per_device_train_batch_size"], out["gradient_accumulation_steps"]) == (plan.rows,
                                                                                       plan.gradient_accumulation_steps)
    assert out["gradient_checkpointing"] is plan.gradient_checkpointing and out["max_length"] == plan.row_tokens
    assert out["use_liger_kernel"] is False and out["optim"] == "adamw_torch"  # Liger and fused AdamW: CUDA only
    plain = _sft(_cfg(packing=False, micro_batch_size=3), None, cuda=False)
    assert not plain["packing"] and not plain["padding_free"] and plain["per_device_train_batch_size"] == 3
    assert plain["max_length"] == 2048 and plain["gradient_checkpointing"] is True
    assert _sft(_cfg(), plan, cuda=True)["optim"] == "adamw_torch_fused"
    assert _sft(_cfg(optim="paged_adamw_8bit"), plan, cuda=True)["optim"] == "paged_adamw_8bit"
    # Every key is a real SFTConfig argument (TRL refuses unknown ones).
    import dataclasses

    from trl import SFTConfig

    assert set(out) <= {f.name for f in dataclasses.fields(SFTConfig)}


def test_lengths_look_like_instruction_data():
    lengths = benchmark.sample_lengths(4000, 2048, seed=1)
    assert 225 <= statistics.median(lengths) <= 275
    assert max(lengths) == 2048 and min(lengths) >= benchmark.MIN_TOKENS
    assert 0.005 < sum(n == 2048 for n in lengths) / len(lengths) < 0.04  # the long tail reaches the maximum


def test_synthetic_chat_masks_answers_only():
    data = benchmark.synthetic_chat(20, 32000, 512, seed=3)
    for ids, mask in zip(data["input_ids"], data["assistant_masks"], strict=True):
        assert len(ids) == len(mask) and ids[0] == 1 and ids[-1] == 2 and mask[-1] == 1 and mask[0] == 0
        assert all(3 <= t < 32000 for t in ids[1:-1])


def test_varlen_attention_equals_attention_per_sample():
    """The packed path (CPU reference of the varlen kernel) gives each sample exactly its own causal attention."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    lengths = [5, 9, 3]
    heads, dim = 4, 16
    q, k, v = (torch.randn(1, heads, sum(lengths), dim) for _ in range(3))
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    out, _ = perf.varlen_attention_forward(None, q, k, v, None, scaling=dim**-0.5, cu_seq_lens_q=cu, max_length_q=9)
    assert out.shape == (1, sum(lengths), heads, dim)
    start = 0
    for n in lengths:
        ref = F.scaled_dot_product_attention(q[:, :, start:start + n], k[:, :, start:start + n],
                                             v[:, :, start:start + n], is_causal=True).transpose(1, 2)
        torch.testing.assert_close(out[:, start:start + n], ref)
        start += n


def test_packed_model_forward_matches_separate_samples(tmp_path):
    """A whole Llama forward over a packed row (varlen attention, per-sample positions) = each sample alone."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    perf.register_varlen_attention()
    torch.manual_seed(0)
    config = LlamaConfig(**{**sizing.SHAPES["tiny"].llama_config(), "vocab_size": 100}, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    samples = [torch.randint(3, 100, (n,)) for n in (7, 12, 4)]
    with torch.no_grad():
        alone = [model(input_ids=s[None]).logits[0] for s in samples]
        model.config._attn_implementation = perf.VARLEN_ATTENTION
        ids = torch.cat(samples)[None]
        pos = torch.cat([torch.arange(len(s)) for s in samples])[None]
        cu = torch.tensor([0, 7, 19, 23], dtype=torch.int32)
        packed = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=12,
                       max_length_k=12).logits[0]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-4)


@pytest.mark.integration
def test_benchmark_runs_end_to_end_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = benchmark.main(["--shape", "tiny", "--device", "cpu", "--samples", "12", "--max-length", "96",
                           "--runs", "baseline,default", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    runs = {r["run"]: r for r in report["runs"]}
    assert set(runs) == {"baseline", "default"}
    # both runs see the same samples: the same non-padding and trained tokens
    assert runs["baseline"]["tokens"] == runs["default"]["tokens"] == report["data"]["train_tokens"]
    assert runs["baseline"]["trained_tokens"] == runs["default"]["trained_tokens"]
    assert runs["default"]["plan"]["packing"] is True
    assert runs["default"]["ratio"] > 0 and runs["baseline"]["ratio"] == 1.0
    assert "BENCHMARK_JSON" in capsys.readouterr().out


def test_benchmark_rejects_unknown_runs(capsys):
    assert benchmark.main(["--runs", "baseline,turbo", "--device", "cpu"]) == 2
    assert "turbo" in capsys.readouterr().err


def test_torch_compile_is_opt_in_cuda_only_needs_a_compiler_and_replaces_liger(monkeypatch):
    assert not perf.wants_compile(False, cuda=True)
    assert not perf.wants_compile(True, cuda=False)
    monkeypatch.setattr(perf, "compiler_available", lambda: False)
    assert not perf.wants_compile(True, cuda=True)  # build_trainer then warns once
    monkeypatch.setattr(perf, "compiler_available", lambda: True)
    monkeypatch.setattr(perf, "liger_available", lambda: True)
    assert perf.wants_compile(True, cuda=True)
    assert _sft(_cfg(torch_compile=True), None, cuda=True)["use_liger_kernel"] is False
    assert _sft(_cfg(), None, cuda=True)["use_liger_kernel"] is True


def test_partial_checkpointing_recomputes_only_the_layers_it_does_not_exempt():
    """The callback behind `gradient_checkpointing=auto`: the first N decoder layers run once per step (their
    activations kept), the others twice (forward + recompute in backward), and the gradients do not change."""
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    reference = LlamaForCausalLM(config)
    partial = copy.deepcopy(reference)
    ids = torch.randint(0, 64, (2, 16))
    grads, calls = [], []
    for model, kept in ((reference, 0), (partial, 2)):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        if kept:
            perf.partial_checkpointing_callback(kept).on_train_begin(None, None, None, model=model)
        counts = [0] * 3
        for i, layer in enumerate(model.model.layers):
            # a pre-hook: non-reentrant recomputation stops early, once the tensors it needs are back
            layer.mlp.register_forward_pre_hook(lambda *_, i=i, c=counts: c.__setitem__(i, c[i] + 1))
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        calls.append(counts)
    assert calls[0] == [2, 2, 2]  # every layer recomputed
    assert calls[1] == [1, 1, 2]  # the first two kept their activations
    assert [layer.gradient_checkpointing for layer in partial.model.layers] == [False, False, True]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
