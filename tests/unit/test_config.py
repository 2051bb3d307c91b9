"""The configuration contract: precedence, strict types, all problems at once, docs/SETTINGS.md in sync."""

import json
import os
import re
from pathlib import Path

import pytest

from entrypoints.config import FIELDS, JobConfig, env_name, markdown_table, parse_config
from entrypoints.errors import EXIT_CONFIG, ConfigError

REPO = Path(__file__).resolve().parents[2]


def _env(tmp_path, **extra):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    return {"QLORA_DATA": str(data), "QLORA_BASE_DIR": str(tmp_path / "ml"), **extra}


def test_defaults_parse(tmp_path):
    cfg = parse_config(_env(tmp_path))
    assert isinstance(cfg, JobConfig)
    assert cfg.quantization == "nf4" and cfg.double_quant is True and cfg.lora_target_modules == "all-linear"
    assert cfg.output_uri == str(tmp_path / "ml" / "model")
    assert cfg.checkpoint_path == tmp_path / "ml" / "checkpoints"


def test_precedence_hyperparameters_env_cli(tmp_path):
    hp = tmp_path / "ml" / "input" / "config" / "hyperparameters.json"
    hp.parent.mkdir(parents=True)
    # SageMaker passes every hyperparameter as a JSON string; its own keys start with sagemaker_.
    hp.write_text(json.dumps({"max_steps": "5", "lora_r": "8", "learning_rate": "0.001", "sagemaker_program": "x"}))
    env = _env(tmp_path, QLORA_LORA_R="32", QLORA_LEARNING_RATE="3e-4")
    cfg = parse_config(env, ["--learning-rate", "5e-5"])
    assert (cfg.max_steps, cfg.lora_r, cfg.learning_rate) == (5, 32, 5e-5)


@pytest.mark.parametrize("raw,expected", [("False", False), ("false", False), ("0", False), ("no", False),
                                          ("True", True), ("1", True), ("on", True)])
def test_booleans_are_strict(tmp_path, raw, expected):
    assert parse_config(_env(tmp_path, QLORA_PACKING=raw)).packing is expected


@pytest.mark.parametrize("raw,expected", [("auto", "auto"), ("AUTO", "auto"), ("1", "true"), ("yes", "true"),
                                          ("False", "false"), ("off", "false")])
def test_checkpointing_takes_auto_or_any_boolean(tmp_path, raw, expected):
    assert parse_config(_env(tmp_path, QLORA_GRADIENT_CHECKPOINTING=raw)).gradient_checkpointing == expected


def test_checkpointing_boolean_from_hyperparameters_json(tmp_path):
    hp = tmp_path / "ml" / "input" / "config" / "hyperparameters.json"
    hp.parent.mkdir(parents=True)
    hp.write_text(json.dumps({"gradient_checkpointing": False, "max_gpu_memory_gib": 22}))
    cfg = parse_config(_env(tmp_path))
    assert (cfg.gradient_checkpointing, cfg.max_gpu_memory_gib) == ("false", 22.0)


def test_bad_checkpointing_and_memory_cap_are_errors(tmp_path):
    with pytest.raises(ConfigError) as info:
        parse_config(_env(tmp_path, QLORA_GRADIENT_CHECKPOINTING="some", QLORA_MAX_GPU_MEMORY_GIB="-1"))
    text = str(info.value)
    assert "QLORA_GRADIENT_CHECKPOINTING='some': expected auto or a boolean" in text
    assert "QLORA_MAX_GPU_MEMORY_GIB=-1" in text and "must be 0 (the whole GPU)" in text


def test_activation_offload_that_cannot_apply_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        parse_config(_env(tmp_path, QLORA_ACTIVATION_OFFLOAD="true", QLORA_GRADIENT_CHECKPOINTING="false"))
    assert "QLORA_ACTIVATION_OFFLOAD='true': offloads the inputs of recomputed layers" in str(info.value)
    with pytest.raises(ConfigError, match=r"QLORA_ACTIVATION_OFFLOAD='true': is part of the packed batch plan"):
        parse_config(_env(tmp_path, QLORA_ACTIVATION_OFFLOAD="true", QLORA_PACKING="false"))
    assert parse_config(_env(tmp_path, QLORA_ACTIVATION_OFFLOAD="false")).activation_offload == "false"


@pytest.mark.parametrize("value", ["auto", "off", "/mnt/cache/torch-compile", "s3://bucket/checkpoints/compile-cache/"])
def test_compile_cache_takes_auto_off_a_directory_or_an_s3_prefix(tmp_path, value):
    assert parse_config(_env(tmp_path, QLORA_COMPILE_CACHE=value)).compile_cache == value


@pytest.mark.parametrize("value,why", [
    ("cache/torch", "expected auto, off, an absolute directory (e.g. /mnt/cache/torch-compile) or an s3:// prefix"),
    ("true", "expected auto, off, an absolute directory"),
    ("gs://bucket/cache", "expected auto, off, an absolute directory"),
    ("s3://", "an s3:// prefix needs a bucket, e.g. s3://my-bucket/checkpoints/compile-cache/"),
])
def test_a_bad_compile_cache_names_the_variable_and_what_is_allowed(tmp_path, value, why):
    with pytest.raises(ConfigError) as info:
        parse_config(_env(tmp_path, QLORA_COMPILE_CACHE=value))
    assert info.value.exit_code == EXIT_CONFIG and len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"QLORA_COMPILE_CACHE={value!r}: {why}")


def test_a_compile_cache_store_inside_the_outputs_or_the_data_is_refused(tmp_path):
    env = _env(tmp_path, QLORA_OUTPUT="s3://b/out", QLORA_COMPILE_CACHE="s3://b/out/compile-cache")
    with pytest.raises(ConfigError, match=r"QLORA_COMPILE_CACHE='s3://b/out/compile-cache' and QLORA_OUTPUT='s3://b/out'"
                                          r" overlap .*: the compile cache's files would be mixed with the published"):
        parse_config(env)
    env = _env(tmp_path, QLORA_COMPILE_CACHE=str(tmp_path))
    with pytest.raises(ConfigError, match="the compile cache's files would be read as training data"):
        parse_config(env)


def test_bad_boolean_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"QLORA_PACKING='maybe': expected a boolean"):
        parse_config(_env(tmp_path, QLORA_PACKING="maybe"))


def test_all_problems_reported_at_once(tmp_path):
    env = _env(tmp_path, QLORA_MAX_STEPS="ten", QLORA_LORA_R="0", QLORA_QUANTIZATION="int3", QLORA_MAX_STEP="3",
               QLORA_EVAL_FRACTION="1.5")
    with pytest.raises(ConfigError) as info:
        parse_config(env, ["--lerning-rate", "1"])
    text = str(info.value)
    assert info.value.exit_code == EXIT_CONFIG
    assert len(info.value.problems) == 6, text
    assert "QLORA_MAX_STEPS='ten': expected an integer" in text
    assert "QLORA_LORA_R=0: must be 1 or more" in text
    assert "QLORA_QUANTIZATION='int3': expected one of nf4, fp4, none" in text
    assert "QLORA_MAX_STEP is not a known setting; did you mean QLORA_MAX_STEPS" in text
    assert "QLORA_EVAL_FRACTION=1.5" in text
    assert "--lerning-rate" in text and "--learning-rate" in text


def test_missing_data_and_bad_uris(tmp_path):
    with pytest.raises(ConfigError) as info:
        parse_config({"QLORA_BASE_DIR": str(tmp_path), "QLORA_OUTPUT": "gs://bucket/x"})
    text = str(info.value)
    assert "QLORA_DATA is not set" in text and "QLORA_OUTPUT='gs://bucket/x': only s3:// URIs" in text


def test_local_data_must_exist_unless_launcher(tmp_path):
    env = {"QLORA_DATA": str(tmp_path / "missing.jsonl"), "QLORA_BASE_DIR": str(tmp_path)}
    with pytest.raises(ConfigError, match="no such file"):
        parse_config(env)
    assert parse_config(env, check_paths=False).data.endswith("missing.jsonl")


def test_sagemaker_channels_fill_unset_inputs(tmp_path):
    train = tmp_path / "ml" / "input" / "data" / "train"
    train.mkdir(parents=True)
    (train / "a.jsonl").write_text('{"text": "x"}\n')
    cfg = parse_config({"QLORA_BASE_DIR": str(tmp_path / "ml"), "SM_CHANNEL_MODEL": "/opt/ml/input/data/model"})
    assert cfg.data == str(train) and cfg.model == "/opt/ml/input/data/model"
    explicit = parse_config({"QLORA_BASE_DIR": str(tmp_path / "ml"), "QLORA_MODEL": "org/name",
                             "SM_CHANNEL_MODEL": "/x"})
    assert explicit.model == "org/name"


def test_unreadable_hyperparameters_file(tmp_path):
    hp = tmp_path / "ml" / "input" / "config" / "hyperparameters.json"
    hp.parent.mkdir(parents=True)
    hp.write_text("{not json")
    with pytest.raises(ConfigError, match="hyperparameters.json: cannot be read as JSON"):
        parse_config(_env(tmp_path))


def test_unknown_hyperparameter(tmp_path):
    hp = tmp_path / "ml" / "input" / "config" / "hyperparameters.json"
    hp.parent.mkdir(parents=True)
    hp.write_text(json.dumps({"epochs": "3"}))
    with pytest.raises(ConfigError, match="key 'epochs' is not a known setting"):
        parse_config(_env(tmp_path))


def test_every_field_is_documented():
    for name, f in FIELDS.items():
        assert f.metadata["doc"].strip(), name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name)


def test_settings_table_matches_code():
    doc = (REPO / "docs" / "SETTINGS.md").read_text()
    start, end = "<!-- settings-table:start -->", "<!-- settings-table:end -->"
    assert start in doc and end in doc, "docs/SETTINGS.md must hold the generated settings table"
    table = doc.split(start, 1)[1].split(end, 1)[0].strip()
    assert table == markdown_table(), ("docs/SETTINGS.md's table of variables is out of date: regenerate it with"
                                       " `python -m entrypoints.config --markdown`")
    for name in FIELDS:
        assert env_name(name) in table


def test_secrets_are_not_settings():
    for secret in ("hf_token", "wandb_api_key", "aws_secret_access_key"):
        assert secret not in FIELDS


def test_a_relative_model_directory_is_checked_for_overlaps_too(tmp_path, monkeypatch):
    """`QLORA_MODEL=models/tiny QLORA_OUTPUT=models/tiny` wrote the outputs into the base model: a relative local
    path was taken for a Hub id and not compared."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    with pytest.raises(ConfigError, match="QLORA_OUTPUT='models/tiny' and QLORA_MODEL='models/tiny' overlap"):
        parse_config({"QLORA_DATA": str(data), "QLORA_MODEL": "models/tiny", "QLORA_OUTPUT": "models/tiny",
                      "QLORA_BASE_DIR": str(tmp_path / "ml")})


def test_problems_name_where_the_value_came_from(tmp_path):
    hp = tmp_path / "ml" / "input" / "config" / "hyperparameters.json"
    hp.parent.mkdir(parents=True)
    hp.write_text(json.dumps({"max_steps": 0, "lora_target_modules": ["q_proj", "v_proj"]}))
    with pytest.raises(ConfigError) as err:
        parse_config({"QLORA_DATA": "s3://b/d", "QLORA_BASE_DIR": str(tmp_path / "ml")}, check_paths=False)
    assert f"{hp} key 'max_steps'=0: must be a positive number of steps" in str(err.value)
    cfg = parse_config({"QLORA_DATA": "s3://b/d", "QLORA_BASE_DIR": str(tmp_path / "ml")}, ["--max-steps", "5"],
                       check_paths=False)
    assert cfg.target_modules == ["q_proj", "v_proj"]  # a JSON list of modules is the list, not its text


def test_check_without_data_shows_the_settings_and_names_what_is_missing(tmp_path, monkeypatch, capsys):
    """`python -m entrypoints.config --check` in an empty environment: the settings it would use, then one clear
    problem (exit 2); with other problems too, every problem is listed and nothing is printed as valid."""
    from entrypoints.config import main

    for key in [k for k in os.environ if k.startswith(("QLORA_", "SM_CHANNEL_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("QLORA_BASE_DIR", str(tmp_path / "ml"))
    assert main(["--check"]) == 2
    out, err = capsys.readouterr()
    shown = json.loads(out)
    assert shown["data"] == "" and shown["lora_r"] == 16 and shown["model"] == FIELDS["model"].default
    assert err.startswith("configuration error: QLORA_DATA is not set") and "python -m entrypoints.train --help" in err

    monkeypatch.setenv("QLORA_LORA_R", "x")
    assert main(["--check"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "2 configuration problem(s)" in err and "QLORA_LORA_R='x'" in err and "QLORA_DATA" in err
    monkeypatch.delenv("QLORA_LORA_R")
    (tmp_path / "d.jsonl").write_text("{}\n")
    assert main(["--check", "--data", str(tmp_path / "d.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["data"] == str(tmp_path / "d.jsonl")


# ------------------------------------------------------------------------ eval suites, early stopping, promotion
@pytest.mark.parametrize(("settings", "policy", "metric"), [
    ({}, "always", "eval_loss"),  # not versioned: latest.json is not written at all
    ({"QLORA_OUTPUT_EXISTS": "version"}, "always", "eval_loss"),  # a split of moving data is no fixed yardstick
    ({"QLORA_OUTPUT_EXISTS": "version", "QLORA_EVAL_SUITE": "s3://b/suites/facts.jsonl,s3://b/f.jsonl"},
     "if-not-worse", "facts/score"),
    ({"QLORA_OUTPUT_EXISTS": "version", "QLORA_EVAL_DATA": "s3://b/eval/", "QLORA_EVAL_FRACTION": "0"},
     "if-not-worse", "eval_loss"),
    ({"QLORA_OUTPUT_EXISTS": "version", "QLORA_EVAL_DATA": "s3://b/eval/", "QLORA_EVAL_FRACTION": "0",
      "QLORA_PROMOTE": "never"}, "never", "eval_loss"),
    ({"QLORA_OUTPUT_EXISTS": "version", "QLORA_EVAL_SUITE": "s3://b/facts.jsonl", "QLORA_PROMOTE": "always",
      "QLORA_PROMOTE_METRIC": "facts/rouge_l"}, "always", "facts/rouge_l"),
])
def test_the_promotion_defaults_are_decided_in_one_place(tmp_path, settings, policy, metric):
    cfg = parse_config(_env(tmp_path, **settings), check_paths=False)
    assert (cfg.promote_policy, cfg.promote_on) == (policy, metric)


@pytest.mark.parametrize(("settings", "problem"), [
    ({"QLORA_EVAL_SUITE": "s3://b/a/facts.jsonl,s3://b/b/facts.jsonl"}, "are both named 'facts'"),
    ({"QLORA_EVAL_SUITE": "s3://b/suites/"}, "is not a JSON Lines file"),
    ({"QLORA_EVAL_SUITE": "gs://b/facts.jsonl"}, "only s3:// URIs and local paths"),
    ({"QLORA_EVAL_SUITE": "missing/facts.jsonl"}, "'missing/facts.jsonl': no such file"),
    ({"QLORA_PROMOTE": "if-not-worse"}, "QLORA_PROMOTE='if-not-worse': the gate moves `latest.json` of a versioned"),
    ({"QLORA_OUTPUT_EXISTS": "version", "QLORA_EVAL_SUITE": "s3://b/facts.jsonl", "QLORA_PROMOTE_METRIC": "fact/score"},
     "QLORA_PROMOTE_METRIC='fact/score': expected eval_loss or <suite>/<metric> with a suite of QLORA_EVAL_SUITE (facts)"),
    ({"QLORA_OUTPUT_EXISTS": "version", "QLORA_EVAL_SUITE": "s3://b/facts.jsonl", "QLORA_PROMOTE_METRIC": "facts/bleu"},
     "and a metric of exact_match, contains, token_f1, rouge_l, score"),
    ({"QLORA_OUTPUT_EXISTS": "version", "QLORA_PROMOTE": "if-not-worse", "QLORA_EVAL_FRACTION": "0"},
     "the promotion gate compares eval_loss, and this run has no eval data"),
    ({"QLORA_PROMOTE_TOLERANCE": "-0.1"}, "QLORA_PROMOTE_TOLERANCE=-0.1: must be 0 or more"),
    ({"QLORA_EARLY_STOPPING_PATIENCE": "3"}, "QLORA_EARLY_STOPPING_PATIENCE=3: needs QLORA_EVAL_STEPS"),
    ({"QLORA_EARLY_STOPPING_PATIENCE": "3", "QLORA_EVAL_STEPS": "10", "QLORA_SAVE_STEPS": "20",
      "QLORA_EVAL_FRACTION": "0"}, "needs QLORA_EVAL_STEPS (how often the eval loss is measured) and eval data"),
    ({"QLORA_EVAL_STEPS": "30"}, "QLORA_SAVE_STEPS=100 is not a multiple of QLORA_EVAL_STEPS=30"),
    ({"QLORA_GENERATION_BATCH_SIZE": "-1"}, "QLORA_GENERATION_BATCH_SIZE=-1: must be 0 (as many as fit) or more"),
])
def test_eval_suite_early_stopping_and_promotion_problems_name_the_setting(tmp_path, settings, problem):
    with pytest.raises(ConfigError) as info:
        parse_config(_env(tmp_path, **settings))
    assert problem in str(info.value)


def test_good_evaluation_settings_parse(tmp_path):
    suite = tmp_path / "facts.jsonl"
    suite.write_text('{"prompt": "Q?", "reference": "A"}\n')
    cfg = parse_config(_env(tmp_path, QLORA_EVAL_SUITE=f" {suite} ", QLORA_EVAL_STEPS="10", QLORA_SAVE_STEPS="20",
                            QLORA_EARLY_STOPPING_PATIENCE="2", QLORA_OUTPUT_EXISTS="version",
                            QLORA_PROMOTE_METRIC="facts/token_f1", QLORA_PROMOTE_TOLERANCE="0.02"))
    assert cfg.promote_policy == "if-not-worse" and cfg.promote_on == "facts/token_f1"


@pytest.mark.parametrize("name", ["QLORA_MAX_TRUNCATED_FRACTION", "QLORA_MAX_DUPLICATE_FRACTION"])
def test_data_limits_are_fractions(tmp_path, name):
    assert getattr(parse_config(_env(tmp_path, **{name: "1"})), name[6:].lower()) == 1.0
    with pytest.raises(ConfigError, match=f"{name}=1.5: must be a fraction between 0 and 1"):
        parse_config(_env(tmp_path, **{name: "1.5"}))
