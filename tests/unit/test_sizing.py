"""The memory model and the batch plan (entrypoints/sizing.py): parameter and FLOP counts, bytes, the plan.

    PYTHONPATH=$PWD python -m pytest tests/unit/test_sizing.py
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from entrypoints import sizing
from entrypoints.config import JobConfig
from entrypoints.trainer import sft_config

GIB = sizing.GIB


def _cfg(**kw):
    return JobConfig(data="x", **kw)


def _plan(**kw):
    return sizing.PlanSettings.of(_cfg(**kw))


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
    plan = sizing.plan_batch(_plan(micro_batch_tokens=4096), 80 * GIB, sizing.SHAPES["7b"], mean_sample_tokens=400)
    assert plan.rows == 2 and plan.micro_batch_tokens == 4096 and plan.gradient_accumulation_steps == 2


def test_micro_batch_tokens_above_one_step_never_make_the_step_larger():
    """micro_batch_tokens=16384 with steps of 4x4 samples of ~400 tokens (6,400) made every optimizer step 16,384
    tokens; a micro-batch is at most one step."""
    plan = sizing.plan_batch(_plan(micro_batch_tokens=16384), 80 * GIB, sizing.SHAPES["7b"], mean_sample_tokens=400)
    assert plan.micro_batch_tokens * plan.gradient_accumulation_steps <= 6400 and plan.gradient_accumulation_steps == 1
    assert "capped at one step's 6400" in plan.reason


def test_small_memory_plan_offloads_then_uses_8bit_state_and_grows_micro_batches():
    """At the small end the plan first offloads the recomputed layers' inputs (more rows per micro-batch), then keeps
    AdamW's state in 8 bits, each only where it buys rows, and never where the whole step fits without it."""
    seven = sizing.SHAPES["7b"]

    def plan(gib, **kw):
        return sizing.plan_batch(replace(_plan(**kw), capped=True), int(gib * GIB), seven, mean_sample_tokens=412)

    roomy = plan(22)
    assert (roomy.activation_offload, roomy.optim, roomy.rows, roomy.fits) == (False, "", 3, True)
    # trl-best's 8.2 GiB: 2 rows without offload, the whole step (3 rows) with it.
    assert sizing.plan_batch(replace(_plan(activation_offload="false"), capped=True), int(8.2 * GIB), seven,
                             mean_sample_tokens=412).rows == 2
    mid = plan(8.2)
    assert (mid.activation_offload, mid.optim, mid.rows, mid.gradient_accumulation_steps) == (True, "", 3, 1)
    assert mid.layers_without_checkpointing == 0 and "offloaded to CPU memory" in mid.reason
    # Unsloth's 5.6 GiB: one row only with offload (the old plan OOMed there); 8-bit state adds no row, so it stays off.
    unsloth = plan(5.6)
    assert (unsloth.activation_offload, unsloth.optim, unsloth.rows, unsloth.fits) == (True, "", 1, True)
    # 5.2 GiB: only with 8-bit moments as well.
    tight = plan(5.2)
    assert (tight.activation_offload, tight.optim, tight.rows, tight.fits) == (True, "adamw_8bit", 1, True)
    assert "adamw_8bit keeps AdamW's state in 8 bits" in tight.reason
    # The estimate of the chosen plan, with the small-end allocator overhead, stays inside the cap.
    for p, gib in ((unsloth, 5.6), (tight, 5.2), (mid, 8.2)):
        s = replace(_plan(), capped=True, optim=p.optim or "auto")
        fixed = sizing.fixed_bytes(seven, s) - sizing.CONTEXT_BYTES
        activations = p.micro_batch_tokens * sizing.offloaded_bytes_per_token(seven)
        assert fixed + sizing.SMALL_END_ACTIVATION_FACTOR * activations <= gib * GIB


def test_the_plan_refuses_a_budget_not_even_the_smallest_plan_fits_and_names_the_least_that_does():
    seven = sizing.SHAPES["7b"]
    settings = replace(_plan(), capped=True)
    smallest = sizing.smallest_budget_bytes(seven, settings)
    assert 5.0 * GIB < smallest < 5.2 * GIB  # one row of 2048, offload, 8-bit AdamW, 4-bit weights of 7B
    assert sizing.plan_batch(settings, int(smallest) + 1, seven, 412).fits
    refused = sizing.plan_batch(settings, int(smallest) - 1, seven, 412)
    assert not refused.fits and refused.smallest_budget_bytes == smallest and "DOES NOT FIT" in refused.reason
    # The old behaviour forced (no offload, fused AdamW) needs more, and the whole GPU adds the CUDA context.
    old = replace(_plan(activation_offload="false", optim="adamw_torch_fused"), capped=True)
    assert not sizing.plan_batch(old, int(5.6 * GIB), seven, 412).fits
    assert sizing.smallest_budget_bytes(seven, old) > 5.6 * GIB
    assert sizing.smallest_budget_bytes(seven, _plan()) == pytest.approx(smallest + sizing.CONTEXT_BYTES)
    # 8-bit optimizers set by the user count 10 bytes per LoRA parameter; 32-bit ones 16.
    lora = sizing.lora_params(seven, 16)
    assert (sizing.fixed_bytes(seven, _plan(optim="paged_adamw_32bit")) - sizing.fixed_bytes(seven, _plan(optim="adamw_8bit"))
            == pytest.approx(6 * lora))


def test_memory_levels_follow_the_settings():
    assert sizing.memory_levels(_plan()) == [(False, ""), (True, ""), (True, "adamw_8bit")]
    assert sizing.memory_levels(_plan(activation_offload="false")) == [(False, ""), (False, "adamw_8bit")]
    assert sizing.memory_levels(_plan(activation_offload="true", optim="adamw_torch")) == [(True, "")]
    assert sizing.memory_levels(_plan(gradient_checkpointing="false")) == [(False, ""), (False, "adamw_8bit")]
    # Offload forced: every layer recomputed even where memory is plentiful; CPU never offloads.
    forced = sizing.plan_batch(_plan(activation_offload="true"), 80 * GIB, sizing.SHAPES["7b"], 412)
    assert forced.activation_offload and forced.layers_without_checkpointing == 0 and forced.optim == ""
    cpu = sizing.plan_batch(_plan(activation_offload="true"), 1 << 50, sizing.SHAPES["7b"], 412, on_gpu=False)
    assert not cpu.activation_offload and cpu.fits


def test_the_chosen_memory_savers_reach_the_trainer_arguments():
    seven = sizing.SHAPES["7b"]
    tight = sizing.plan_batch(replace(_plan(), capped=True), int(5.2 * GIB), seven, 412)
    kwargs = sft_config(_cfg(), tight, cuda=True, precision="bfloat16", has_eval=False, report_to="none")
    assert kwargs["optim"] == "adamw_8bit" and kwargs["activation_offloading"] is True
    assert kwargs["per_device_train_batch_size"] == 1 and kwargs["gradient_checkpointing"] is True
    # A set optimizer wins over the plan's pick; no plan or no CUDA: no offload.
    assert sft_config(_cfg(optim="adamw_torch"), tight, True, "bfloat16", False, "none")["optim"] == "adamw_torch"
    assert sft_config(_cfg(), tight, False, "bfloat16", False, "none")["activation_offloading"] is False
    roomy = sizing.plan_batch(_plan(), 80 * GIB, seven, 412)
    kwargs = sft_config(_cfg(), roomy, cuda=True, precision="bfloat16", has_eval=False, report_to="none")
    assert kwargs["optim"] == "adamw_torch_fused" and kwargs["activation_offloading"] is False


# ------------------------------------------------------------------------------------------- parallelism (FSDP)
def test_the_sharded_estimate_divides_weights_and_lora_state_and_adds_what_fsdp_gathers():
    thirteen, s = sizing.SHAPES["13b"], _plan()
    state = sizing.weight_bytes(thirteen) + 16.0 * sizing.lora_params(thirteen, 16)
    assert sizing.fixed_bytes(thirteen, s) == pytest.approx(state + GIB)
    gathered = sizing.gathered_bytes(thirteen, s)
    assert sizing.fixed_bytes(thirteen, s, 2) == pytest.approx(state / 2 + gathered + GIB)
    # the largest unit: the bf16 LM head (32000 x 5120 x 2 bytes), above one layer's 4-bit weights, twice (prefetch)
    assert gathered == pytest.approx(2 * 2 * 32000 * 5120)
    assert sizing.minimum_gpu_bytes(thirteen, s, 4) < sizing.minimum_gpu_bytes(thirteen, s, 2) < \
        sizing.minimum_gpu_bytes(thirteen, s)
    # the load: the whole 4-bit model, sharded or not
    assert sizing.load_bytes(thirteen, s) == pytest.approx(sizing.weight_bytes(thirteen) + GIB)


def test_auto_picks_ddp_when_one_gpu_holds_the_model_and_fsdp_when_only_the_shards_fit():
    s = _plan()
    seven, thirteen, seventy = sizing.SHAPES["7b"], sizing.SHAPES["13b"], sizing.SHAPES["70b"]
    assert sizing.choose_parallelism("auto", seven, s, 2, 24 * GIB).mode == "ddp"
    assert sizing.choose_parallelism("auto", thirteen, s, 2, 24 * GIB).mode == "ddp"
    # 13B needs ~10.3 GiB whole: not in 80% of 10 GiB, but sharded over 2 (~7.1 GiB) it is
    tight = sizing.choose_parallelism("auto", thirteen, s, 2, 10 * GIB)
    assert tight.mode == "fsdp" and tight.shards == 2 and "does not fit one GPU" in tight.reason
    # 70B over 4 x 48 GB: sharded; over 4 x 24 GB the shards would fit, but not the whole 4-bit model while it loads
    assert sizing.choose_parallelism("auto", seventy, s, 4, 48 * GIB).mode == "fsdp"
    assert sizing.minimum_gpu_bytes(seventy, s, 4) < 0.8 * 24 * GIB
    refused = sizing.choose_parallelism("auto", seventy, s, 4, 24 * GIB)
    assert refused.mode == "ddp" and "while it loads" in refused.reason
    # one process, no GPU, an unknown shape, an explicit choice
    assert sizing.choose_parallelism("fsdp", thirteen, s, 1, 10 * GIB).mode == "single"
    assert sizing.choose_parallelism("auto", thirteen, s, 2, None).mode == "ddp"
    assert sizing.choose_parallelism("auto", None, s, 2, 10 * GIB).mode == "ddp"
    assert sizing.choose_parallelism("fsdp", seven, s, 2, 80 * GIB).mode == "fsdp"
    assert sizing.choose_parallelism("ddp", thirteen, s, 2, 10 * GIB).mode == "ddp"


def test_a_sharded_plan_spends_the_memory_fsdp_frees_on_larger_micro_batches():
    # Without activation offload, which would add rows to both (the small-memory plan's own tests cover it).
    thirteen, s = sizing.SHAPES["13b"], _plan(activation_offload="false")
    whole = sizing.plan_batch(s, 22 * GIB, thirteen, mean_sample_tokens=2048)
    sharded = sizing.plan_batch(s, 22 * GIB, thirteen, mean_sample_tokens=2048, shards=2)
    assert (whole.rows, sharded.rows) == (5, 7)
    assert "sharded over 2 GPUs" in sharded.reason and "sharded" not in whole.reason


def test_a_prequantized_checkpoint_is_sized_in_its_stored_form():
    """A bitsandbytes 4-bit checkpoint (config.json's quantization_config, or a `*-bnb-4bit` name): its files are the
    4-bit size (37 GB for 70B, not 138), it trains in the stored form whatever the settings say, and its merged model
    is 16-bit."""
    from launch import estimate

    config = {"model_type": "llama", **sizing.SHAPES["7b"].llama_config(), "num_attention_heads": 32,
              "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                      "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False}}
    stored = sizing.ModelShape.from_config(config)
    assert stored.stored_4bit and not stored.stored_double_quant
    plain = sizing.SHAPES["7b"]
    assert sizing.weight_bytes(stored, "none", True) == sizing.weight_bytes(plain, "nf4", False)
    assert not sizing.ModelShape.from_config({**config, "quantization_config": {"quant_method": "gptq"}}).stored_4bit

    by_name = sizing.shape_of_model("unsloth/llama-2-70b-bnb-4bit")
    assert by_name.stored_4bit and not sizing.shape_of_model("meta-llama/Llama-2-70b-hf").stored_4bit
    assert 34e9 < sizing.checkpoint_bytes(by_name) < 40e9
    assert sizing.checkpoint_bytes(sizing.SHAPES["70b"]) == pytest.approx(138e9, rel=0.01)
    assert sizing.merged_bytes(by_name) == sizing.checkpoint_bytes(sizing.SHAPES["70b"])
    four_bit, sixteen_bit = (estimate.disk_need_bytes(s, merge=True) for s in (by_name, sizing.SHAPES["70b"]))
    saved = sizing.checkpoint_bytes(sizing.SHAPES["70b"]) - sizing.checkpoint_bytes(by_name)  # the download only
    assert sixteen_bit - four_bit == pytest.approx(1.1 * saved, rel=0.001)
