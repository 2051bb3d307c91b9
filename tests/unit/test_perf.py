"""Unit tests of the fast path's decisions and of the benchmark, on CPU.

    PYTHONPATH=$PWD python -m pytest tests/unit/test_perf.py
"""

from __future__ import annotations

import statistics

from entrypoints import perf, sizing
from entrypoints.bench import throughput as benchmark
from entrypoints.config import JobConfig
from entrypoints.trainer import sft_config

GIB = sizing.GIB


def _cfg(**kw):
    return JobConfig(data="x", **kw)


def _plan(**kw):
    return sizing.PlanSettings.of(_cfg(**kw))


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


def test_benchmark_rejects_unknown_runs(capsys):
    assert benchmark.main(["--runs", "baseline,turbo", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "turbo" in err and "trl-best, trl-best-no-ckpt, unsloth" in err


def test_benchmark_cli_takes_peers_and_at_memory_of(capsys):
    args = benchmark.parse_args(["--runs", "trl-best,unsloth", "--at-memory-of", "trl-best,unsloth", "--peer-rows",
                                 "4", "--unsloth-path", "/tmp/uns"])
    assert (args.at_memory_of, args.peer_rows, args.unsloth_path) == ("trl-best,unsloth", 4, "/tmp/uns")
    # A run to compare at must be measured first, in the same invocation.
    assert benchmark.main(["--runs", "default", "--at-memory-of", "trl-best", "--device", "cpu"]) == 2
    assert "--at-memory-of: trl-best not in --runs" in capsys.readouterr().err
    assert benchmark.peer_installed("unsloth", "/nonexistent").startswith("not installed")
    # LEVER@GIB caps a lever; LEVER@RUN caps it at an earlier run's peak.
    assert benchmark.run_name_problem("default@5.6", []) is None
    assert benchmark.run_name_problem("no-savers@trl-best", ["trl-best"]) is None
    assert "neither a number of GiB nor a run named before it" in benchmark.run_name_problem("default@trl-best", [])
    assert "'turbo' is not a lever" in benchmark.run_name_problem("turbo@5.6", [])
    assert benchmark.main(["--runs", "default@unsloth,unsloth", "--device", "cpu"]) == 2


def test_benchmark_report_compares_each_peer_with_the_job_at_its_memory(capsys):
    runs = [{"run": "baseline", "tokens_per_second": 2000.0},
            {"run": "trl-best", "tokens_per_second": 5886.0, "peak_reserved_gib": 8.2},
            {"run": "unsloth", "skipped": "not installed (no unsloth module on sys.path; see docs/PERF.md)"},
            {"run": "default@trl-best", "peer": "trl-best", "peer_memory_gib": 8.2, "tokens_per_second": 8829.0},
            {"run": "default@unsloth", "peer": "unsloth", "peer_memory_gib": None, "error": "unsloth has no measured"
             " peak memory (a GPU run that finished is needed)"}]
    benchmark.add_ratios(runs)
    assert runs[1]["ratio"] == 2.94 and runs[3]["vs_peer"] == 1.5 and "vs_peer" not in runs[4]
    benchmark.print_table({"runs": runs})
    lines = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:5] == ["run", "tokens_per_second", "ratio", "vs_peer", "peer_memory_gib"]
    row = dict(zip(header, (c.strip() for c in lines[5].strip("|").split("|")), strict=True))
    assert (row["run"], row["vs_peer"], row["peer_memory_gib"], row["ratio"]) == ("default@trl-best", "1.5", "8.2",
                                                                                "4.41")
    assert "not installed" in lines[4]


def test_torch_compile_is_on_by_default_on_cuda_where_triton_can_build_and_replaces_liger(monkeypatch):
    monkeypatch.setattr(perf, "compiler_available", lambda: True)
    monkeypatch.setattr(perf, "liger_available", lambda: True)
    assert _cfg().torch_compile == "auto" and perf.wants_compile("auto", cuda=True)
    assert perf.wants_compile("true", cuda=True)
    assert not perf.wants_compile("false", cuda=True)
    assert not perf.wants_compile("auto", cuda=False) and not perf.wants_compile("true", cuda=False)
    assert _sft(_cfg(), None, cuda=True)["use_liger_kernel"] is False  # compiled instead
    assert _sft(_cfg(torch_compile="false"), None, cuda=True)["use_liger_kernel"] is True
    # `auto` with some layers kept and some recomputed: Liger's kernels (faster there), unless asked for
    assert not perf.wants_compile("auto", cuda=True, partial_checkpointing=True)
    assert perf.wants_compile("true", cuda=True, partial_checkpointing=True)
    partial = sizing.BatchPlan(2, 4096, 1, True, 20, "", 2048)
    assert _sft(_cfg(), partial, cuda=True)["use_liger_kernel"] is True
    every = sizing.BatchPlan(2, 4096, 1, True, 0, "", 2048)
    assert _sft(_cfg(), every, cuda=True)["use_liger_kernel"] is False
    monkeypatch.setattr(perf, "compiler_available", lambda: False)
    assert not perf.wants_compile("auto", cuda=True)  # no C compiler: `true` warns once in build_trainer
    assert not perf.wants_compile("true", cuda=True)


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


def test_compile_leaves_checkpoints_outside_the_compiled_code():
    """With any layer recomputed, every layer is compiled block by block (the checkpoint replays compiled blocks);
    with none, each layer is compiled whole. Compilation is lazy: nothing is compiled until the first forward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    assert perf.compile_layers(model, recomputed=lambda index: index >= 1) == 3
    for layer in model.model.layers:  # one layer recomputed: every layer by blocks (one way for all)
        assert layer._compiled_call_impl is None
        assert all(child._compiled_call_impl is not None for child in layer.children())
    whole = LlamaForCausalLM(config)
    perf.compile_layers(whole, recomputed=lambda index: False)
    assert all(layer._compiled_call_impl is not None for layer in whole.model.layers)


def test_a_part_that_fails_to_compile_runs_uncompiled_with_one_warning_line(caplog):
    """torch.compile failing on a frame (here: a backend that raises) is one warning naming the cause, then the
    same forward and backward uncompiled, never a crash and never a traceback per frame."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def failing_backend(graph, example_inputs):
        raise RuntimeError("the backend gave up\nsecond line")

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(config).train()
    ids = torch.randint(0, 64, (2, 16))
    expected = model(input_ids=ids, labels=ids).loss
    perf.fall_back_to_eager()
    for layer in model.model.layers:
        layer.compile(backend=failing_backend)
    with caplog.at_level("WARNING"):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    torch.testing.assert_close(loss, expected)
    notices = [r for r in caplog.records if "could not compile" in r.getMessage()]
    assert len(notices) == 1 and "RuntimeError: the backend gave up" in notices[0].getMessage()
    assert "second line" not in caplog.text and "Traceback" not in caplog.text


def test_the_job_refuses_a_memory_budget_too_small_for_its_smallest_plan(monkeypatch):
    """max_gpu_memory_gib below the smallest plan: a configuration error (exit 2) naming the setting and the least
    budget that fits, before the model loads, instead of a run that starts and runs out of memory. The GPU's
    budget (what torch reports on a GPU) is given here; the plan and the message are the job's own."""
    import pytest

    from entrypoints.errors import EXIT_CONFIG, ConfigError

    seven = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "vocab_size": 32000}
    stats = {"train_records": 100, "train_tokens": 41200, "longest_record_tokens": 2048}
    monkeypatch.setattr(perf, "gpu_budget", lambda: (int(4.5 * GIB), True))
    with pytest.raises(ConfigError) as info:
        perf.plan_for(_plan(max_gpu_memory_gib=4.5), seven, stats)
    text = str(info.value)
    assert info.value.exit_code == EXIT_CONFIG == 2
    assert "QLORA_MAX_GPU_MEMORY_GIB=4.5 GiB is too small" in text and "at least 5.1" in text
    assert "offloaded to CPU memory, adamw_8bit optimizer state" in text and "QLORA_MAX_SEQ_LENGTH (now 2048)" in text
    # The old behaviour forced: the message names the savers that would make it fit.
    monkeypatch.setattr(perf, "gpu_budget", lambda: (int(5.6 * GIB), True))
    with pytest.raises(ConfigError, match="QLORA_ACTIVATION_OFFLOAD=auto, QLORA_OPTIM=auto"):
        perf.plan_for(_plan(activation_offload="false", optim="adamw_torch_fused"), seven, stats)
    plan = perf.plan_for(_plan(max_gpu_memory_gib=5.6), seven, stats)
    assert plan.activation_offload and plan.rows == 1
    record = perf.plan_record(plan, "adamw_torch_fused")
    assert record["activation_offload"] is True and record["smallest_budget_gib"] == 5.06
    # A whole GPU too small names the GPU instead, with the CUDA context counted.
    monkeypatch.setattr(perf, "gpu_budget", lambda: (int(5.6 * GIB), False))
    with pytest.raises(ConfigError, match=r"this GPU's 5.6 GiB are too small .* at least 6.1 GiB"):
        perf.plan_for(_plan(), seven, stats)


def test_fsdp_trainer_arguments_are_transformers_own_fsdp2_with_the_trainers_checkpointing():
    """The arguments sft_config + perf.fsdp_arguments build, through the real SFTConfig: the plugin accelerate gets."""
    from trl import SFTConfig

    from entrypoints.trainer import _checkpointing_name

    plan = sizing.BatchPlan(rows=2, micro_batch_tokens=4096, gradient_accumulation_steps=2,
                            gradient_checkpointing=True, layers_without_checkpointing=0, reason="", row_tokens=2048)
    kwargs = sft_config(JobConfig(data="x"), plan, cuda=False, precision="bfloat16", has_eval=False, report_to="none")
    kwargs.update(perf.fsdp_arguments(["LlamaDecoderLayer"]))
    args = SFTConfig(**_checkpointing_name(kwargs, SFTConfig))
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert plugin["state_dict_type"] == "FULL_STATE_DICT" and plugin["reshard_after_forward"] is True
    # FSDP's own checkpoint wrapper would rename the layers' parameters (peft then saves an empty adapter): the
    # trainer's own checkpointing recomputes the layers the plan says
    assert plugin.get("activation_checkpointing") is False
    assert getattr(args, "activation_checkpointing", getattr(args, "gradient_checkpointing", None)) is True


def test_the_job_plans_ddp_or_fsdp_with_the_memory_of_this_process(monkeypatch):
    monkeypatch.setattr(perf, "usable_gpu_bytes", lambda: 10 * GIB)
    config = sizing.SHAPES["13b"].llama_config()
    settings = sizing.PlanSettings()
    assert perf.parallelism_for(settings, config, 2).mode == "fsdp"
    assert perf.parallelism_for(settings, config, 1).mode == "single"
    assert perf.parallelism_for(settings, {"model_type": "t5", "is_encoder_decoder": True}, 2).mode == "ddp"
    monkeypatch.setattr(perf, "usable_gpu_bytes", lambda: None)  # CPU
    assert perf.parallelism_for(settings, config, 2).mode == "ddp"
