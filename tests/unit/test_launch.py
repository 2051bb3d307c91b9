"""Launcher units: instance catalog, memory/cost estimates, cron conversion, settings, torch-free import.

    PYTHONPATH=$PWD python -m pytest tests/unit/test_launch.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from entrypoints import sizing
from entrypoints.config import parse_config
from launch import cron, estimate, instances, settings, submit

REPO = Path(__file__).resolve().parents[2]


def test_catalog_has_the_families_with_full_specs():
    for family in ("g5", "g6", "g6e", "p4d", "p4de", "p5"):
        assert any(name.startswith(family + ".") for name in instances.INSTANCES), family
    for inst in instances.INSTANCES.values():
        assert inst.gpu_count >= 1 and inst.gpu_memory_gib >= 24 and inst.vcpus >= 4 and inst.ram_gib >= 16
        assert inst.price_per_hour_usd > 0
    p4d = instances.lookup("ml.p4d.24xlarge")
    assert (p4d.gpu_count, p4d.gpu_memory_gib, p4d.sagemaker_type) == (8, 40, "ml.p4d.24xlarge")


def test_unknown_instance_lists_close_matches():
    with pytest.raises(ValueError, match="g5.2xlarge") as info:
        instances.lookup("g5.2xlarg")
    assert "not in the catalog" in str(info.value)


def test_the_fit_check_is_the_jobs_own_memory_model_and_plan():
    """The launcher answers with sizing (the job's memory model): the least memory the job runs in, and the plan
    the job would make on that GPU."""
    cfg = parse_config({"QLORA_DATA": "s3://b/d"}, check_paths=False)
    shape = sizing.SHAPES["7b"]
    assert shape.total_params == pytest.approx(6.74e9, rel=0.01)  # Llama-2-7B's published size
    # r=16 on all 7 linear layers of 32 blocks: 16 * (4*(4096+4096) + 3*(4096+11008)) * 32
    assert sizing.lora_params(shape, 16) == 16 * (4 * 8192 + 3 * 15104) * 32
    assert sizing.lora_params(shape, 16, ("q_proj", "v_proj")) == 16 * 2 * 8192 * 32
    fit = estimate.check_fit(shape, cfg, instances.lookup("g5.2xlarge"))
    settings = sizing.PlanSettings.of(cfg)
    plan = sizing.plan_batch(settings, 24 * sizing.GIB, shape, 1024)
    assert fit.ok and f"{plan.micro_batch_tokens} tokens per micro-batch" in fit.message
    assert f"at least {sizing.smallest_budget_bytes(shape, settings) / sizing.GIB:.1f} GiB per GPU" in fit.message
    # The job's own cap counts, as the allocator's budget (the CUDA context lies outside it): the smallest plan of
    # 7B (one row, offload, 8-bit AdamW) needs ~5.1 GiB there.
    capped = parse_config({"QLORA_DATA": "s3://b/d", "QLORA_MAX_GPU_MEMORY_GIB": "4.5"}, check_paths=False)
    refused = estimate.check_fit(shape, capped, instances.lookup("g5.2xlarge"))
    assert not refused.ok and "max_gpu_memory_gib=4.5" in refused.message and "at least 5.1 GiB" in refused.message
    small = parse_config({"QLORA_DATA": "s3://b/d", "QLORA_MAX_GPU_MEMORY_GIB": "5.6"}, check_paths=False)
    fit = estimate.check_fit(shape, small, instances.lookup("g5.2xlarge"))
    assert fit.ok and "memory short: activation offload" in fit.message


def test_fit_check_refuses_with_numbers_and_warns_when_unknown():
    cfg = parse_config({"QLORA_DATA": "s3://b/d", "QLORA_MODEL": "meta-llama/Llama-2-70b-hf"}, check_paths=False)
    fit = estimate.check_fit(sizing.shape_of_model(cfg.model), cfg, instances.lookup("g5.2xlarge"))
    assert not fit.ok and "GiB per GPU" in fit.message and "vs 24 GiB on each" in fit.message
    # ~34 GiB of 4-bit weights alone: 70B fits an 80 GiB A100 whole, a 40 GiB one only sharded (FSDP over its 8).
    assert estimate.check_fit(sizing.shape_of_model(cfg.model), cfg, instances.lookup("p4de.24xlarge")).ok
    assert "parallelism: fsdp" in estimate.check_fit(sizing.shape_of_model(cfg.model), cfg,
                                                      instances.lookup("p4d.24xlarge")).message
    ddp = parse_config({"QLORA_DATA": "s3://b/d", "QLORA_MODEL": "meta-llama/Llama-2-70b-hf",
                        "QLORA_PARALLELISM": "ddp"}, check_paths=False)
    assert not estimate.check_fit(sizing.shape_of_model(cfg.model), ddp, instances.lookup("p4d.24xlarge")).ok
    unknown = parse_config({"QLORA_DATA": "s3://b/d", "QLORA_MODEL": "s3://b/models/mine"}, check_paths=False)
    fit = estimate.check_fit(sizing.shape_of_model(unknown.model), unknown, instances.lookup("g5.xlarge"))
    assert fit.ok and fit.warning and "skipped" in fit.message


def test_model_shape_from_a_local_config_of_any_name(tmp_path):
    config = tmp_path / "smollm2-config.json"
    config.write_text(json.dumps({
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}))
    shape = sizing.shape_of_model("s3://b/models/smollm2/", config)
    assert shape.total_params == pytest.approx(134.5e6, rel=0.01)  # SmolLM2-135M
    (tmp_path / "config.json").write_text(config.read_text())
    assert sizing.shape_of_model(str(tmp_path)) == sizing.ModelShape.from_config(json.loads(config.read_text()),
                                                                                name=str(tmp_path))


def test_cost_estimate_needs_steps_or_tokens():
    cfg = parse_config({"QLORA_DATA": "s3://b/d", "QLORA_MAX_STEPS": "100"}, check_paths=False)
    inst = instances.lookup("g5.2xlarge")
    cost = estimate.time_and_cost(sizing.SHAPES["7b"], cfg, inst, 1, None)
    tokens = 100 * 4 * 4 * 2048
    per_gpu = estimate.TOKENS_PER_SECOND_7B[inst.gpu_model] * 7 / (sizing.SHAPES["7b"].total_params / 1e9)
    assert cost.seconds == pytest.approx(tokens / per_gpu + estimate.FIXED_OVERHEAD_SECONDS)
    assert cost.usd == pytest.approx(cost.seconds / 3600 * inst.price_per_hour_usd)
    assert cost.message.startswith("ESTIMATE")
    epochs = parse_config({"QLORA_DATA": "s3://b/d"}, check_paths=False)
    assert estimate.time_and_cost(None, epochs, inst, 1, None).seconds is None
    assert estimate.time_and_cost(None, epochs, inst, 2, 10_000_000).usd > 0


@pytest.mark.parametrize(("unix", "eventbridge"), [
    ("0 3 * * *", "cron(0 3 * * ? *)"),
    ("0 3 * * 1", "cron(0 3 ? * MON *)"),
    ("30 2 * * 1-5", "cron(30 2 ? * MON,TUE,WED,THU,FRI *)"),
    ("0 0 * * 0,7", "cron(0 0 ? * SUN *)"),
    ("0 */6 1 * *", "cron(0 */6 1 * ? *)"),
    ("@weekly", "cron(0 0 ? * SUN *)"),
    ("15 4 * * fri-sat", "cron(15 4 ? * FRI,SAT *)"),
])
def test_cron_to_eventbridge(unix, eventbridge):
    assert cron.to_eventbridge(unix) == eventbridge


@pytest.mark.parametrize(("bad", "message"), [
    ("0 3 * *", "expected 5 fields"), ("61 3 * * *", "outside 0-59"), ("0 3 1 * 1", "either"),
    ("0 3 * * FOO", "not a number"), ("0 5-3 * * *", "backwards")])
def test_cron_errors_name_the_problem(bad, message):
    with pytest.raises(cron.CronError, match=message):
        cron.to_eventbridge(bad)


def test_settings_from_set_and_env_file(tmp_path):
    env_file = tmp_path / "job.env"
    env_file.write_text("# comment\nexport QLORA_LORA_R=8\nQLORA_MAX_STEPS='30'\nNCCL_DEBUG=WARN\n\n")
    found, extra, problems = settings.collect(["max_steps=40", "QLORA_DATA=s3://b/d"], [str(env_file)])
    assert problems == []
    assert found == {"QLORA_LORA_R": "8", "QLORA_MAX_STEPS": "40", "QLORA_DATA": "s3://b/d"}  # --set wins
    assert extra == {"NCCL_DEBUG": "WARN"}
    _, _, problems = settings.collect(["nonsense", "lora_rank=4"], [])
    assert "is not NAME=value" in problems[0] and "did you mean lora_r" in problems[1]


def test_a_setting_name_in_an_env_file_is_the_setting(tmp_path):
    """`lora_r=8` in an env file was passed on as a variable named lora_r, and the job kept r=16."""
    env_file = tmp_path / "job.env"
    env_file.write_text("lora_r=8\nMAX_STEPS=5\nnccl_debug=INFO\n")
    found, extra, problems = settings.collect([], [str(env_file)])
    assert problems == [] and found == {"QLORA_LORA_R": "8", "QLORA_MAX_STEPS": "5"}
    assert extra == {"nccl_debug": "INFO"}


def test_help_names_the_documented_command():
    proc = subprocess.run([sys.executable, "-m", "launch.submit", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python launch/submit.py")


def test_all_problems_are_reported_at_once(capsys):
    code = submit.main(["--instance", "g5.2xlarge", "--set", "lora_r=0", "--set", "learning_rate=5",
                        "--set", "data=/local/file.jsonl", "--count", "0", "--schedule", "0 3 1 * 1"])
    err = capsys.readouterr().err
    assert code == 2
    for text in ("QLORA_LORA_R=0", "QLORA_LEARNING_RATE=5.0", "--count 0", "--schedule", "--image is not set",
                 "QLORA_OUTPUT is not set", "nothing was submitted"):
        assert text in err, text


def test_memory_refusal_and_force(capsys):
    base = ["--instance", "g5.2xlarge", "--set", "model=meta-llama/Llama-2-70b-hf", "--dry-run"]
    assert submit.main(base) == 2
    assert "does not fit" in capsys.readouterr().err
    assert submit.main([*base, "--force"]) == 0


def test_launcher_never_imports_torch():
    code = ("import sys; import launch.submit, launch.sagemaker_backend, launch.kubernetes_backend;"
            " print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_script_runs_from_the_repo_root_for_every_variant():
    for extra in (["--backend", "kubernetes"], ["--schedule", "0 3 * * 1"],
                  ["--backend", "kubernetes", "--schedule", "0 3 * * 1", "--count", "2"]):
        proc = subprocess.run([sys.executable, "launch/submit.py", "--instance", "g5.12xlarge", "--dry-run", *extra],
                              cwd=REPO, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip()


def test_a_remote_job_needs_its_eval_suites_in_s3_and_a_promotion_setting_that_means_something(capsys):
    base = ["--instance", "g5.2xlarge", "--set", "data=s3://b/data/train.jsonl", "--set", "output=s3://b/output/run",
            "--dry-run"]
    assert submit.main([*base, "--set", "eval_suite=s3://b/data/suites/facts.jsonl,suites/local.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "QLORA_EVAL_SUITE: suites/local.jsonl: a remote job reads its eval suites from S3" in err
    assert submit.main([*base, "--set", "promote=if-not-worse"]) == 2  # the gate needs a versioned output
    assert "QLORA_PROMOTE='if-not-worse': the gate moves `latest.json` of a versioned output" in capsys.readouterr().err
    assert submit.main([*base, "--set", "eval_suite=s3://b/data/suites/facts.jsonl", "--set", "output_exists=version",
                        "--set", "promote_metric=facts/rouge_l"]) == 0
    capsys.readouterr()


def test_fit_check_shards_a_model_too_large_for_one_gpu_of_a_multi_gpu_instance():
    cfg = parse_config({"QLORA_DATA": "s3://b/d", "QLORA_MODEL": "meta-llama/Llama-2-70b-hf"}, check_paths=False)
    shape = sizing.shape_of_model(cfg.model)
    fit = estimate.check_fit(shape, cfg, instances.lookup("g6e.12xlarge"))  # 4 x 48 GB
    assert fit.ok and "parallelism: fsdp" in fit.message and "sharded over 4 GPUs (FSDP)" in fit.message
    # 4 x 24 GB: the shards would fit, but the whole 4-bit model is loaded on each GPU before it is sharded
    refused = estimate.check_fit(shape, cfg, instances.lookup("g5.12xlarge"))
    assert not refused.ok and "while it loads" in refused.message
    ddp = parse_config({"QLORA_DATA": "s3://b/d", "QLORA_MODEL": "meta-llama/Llama-2-70b-hf",
                        "QLORA_PARALLELISM": "ddp"}, check_paths=False)
    # A whole copy per GPU (34 GiB of 4-bit weights on a 48 GiB GPU): with the small-memory plan's savers
    # (activation offload; docs/PERF.md); without them only one row of 2048, a tight fit with a warning.
    whole = estimate.check_fit(shape, ddp, instances.lookup("g6e.12xlarge"))
    assert whole.ok and "parallelism: ddp" in whole.message and "memory short: activation offload" in whole.message
    no_savers = parse_config({"QLORA_DATA": "s3://b/d", "QLORA_MODEL": "meta-llama/Llama-2-70b-hf",
                              "QLORA_PARALLELISM": "ddp", "QLORA_ACTIVATION_OFFLOAD": "false",
                              "QLORA_OPTIM": "adamw_torch_fused"}, check_paths=False)
    tight = estimate.check_fit(shape, no_savers, instances.lookup("g6e.12xlarge"))
    assert tight.ok and tight.warning and tight.message.startswith("tight fit")
    thirteen = parse_config({"QLORA_DATA": "s3://b/d", "QLORA_MODEL": "meta-llama/Llama-2-13b-hf"}, check_paths=False)
    assert "parallelism: ddp (the model fits one GPU" in estimate.check_fit(
        sizing.shape_of_model(thirteen.model), thirteen, instances.lookup("g5.12xlarge")).message
