"""Data mixing: the settings (bad input refused, naming the variable), the mix drawn by seed with its held-out records
split off each source, the data fingerprint over every source and the weights, and the launcher's requests.

    PYTHONPATH=$PWD python -m pytest tests/unit/test_data_mix.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from entrypoints.checkpoints import latest_complete, mark_complete, run_fingerprint
from entrypoints.config import parse_config
from entrypoints.errors import EXIT_CONFIG, EXIT_DATA, ConfigError, DataError
from launch import submit

from ..jobrun import REPO, job_env, jsonl

A = [{"instruction": f"A question {i}?", "output": f"A answer {i}."} for i in range(60)]
B = [{"instruction": f"B question {i}?", "output": f"B answer {i}."} for i in range(300)]


@pytest.fixture
def sources(tmp_path) -> tuple[Path, Path]:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    return jsonl(tmp_path / "a" / "a.jsonl", A).parent, jsonl(tmp_path / "b" / "b.jsonl", B).parent


@pytest.mark.parametrize(("data", "weights", "message"), [
    ("{a},{b}", "0.7", "QLORA_DATA_WEIGHTS='0.7' gives 1 weight(s) for the 2 sources of QLORA_DATA"),
    ("{a},{b}", "0.7,0.2,0.1", "gives 3 weight(s) for the 2 sources of QLORA_DATA: give one weight per source"),
    ("{a},{b}", "0.7,abc", "QLORA_DATA_WEIGHTS='0.7,abc': 'abc' is not a positive number"),
    ("{a},{b}", "1,0", "QLORA_DATA_WEIGHTS='1,0': '0' is not a positive number"),
    ("{a},{b}", "-1,2", "'-1' is not a positive number"),
    ("{a},{b}", "nan,1", "'nan' is not a positive number"),
    ("{a}", "1", "QLORA_DATA_WEIGHTS='1': weights mix several sources, and QLORA_DATA names one"),
    ("{a},,{b}", "", "item 2 of the comma-separated list is empty: remove the extra comma"),
    ("{a},{b},", "1,1", "item 3 of the comma-separated list is empty"),
    ("{a},{a}", "1,1", "is listed twice (items 1 and 2)"),
    ("{a},{b},{a}/", "1,1,1", "'{a}' and '{a}/' name the same location (items 1 and 3)"),
    ("s3://bkt/new,s3://bkt/new/", "", "'s3://bkt/new' and 's3://bkt/new/' name the same location (items 1 and 2)"),
    ("{a},{a}/a.jsonl", "", "the sources '{a}' and '{a}/a.jsonl' overlap"),
    ("{a},s3:/", "", "QLORA_DATA="),
    ("{a},{missing}", "", "no such file or directory: {missing}"),
    ("{comma}", "", "QLORA_DATA='{comma}': a comma separates the sources of a mix, and this path holds one: rename"),
])
def test_bad_mix_settings_are_refused_naming_the_variable(sources, tmp_path, data, weights, message):
    a, b = sources
    paths = {"a": a, "b": b, "missing": tmp_path / "missing", "comma": jsonl(tmp_path / "new,old.jsonl", A[:2])}
    with pytest.raises(ConfigError) as exc:
        parse_config({"QLORA_DATA": data.format(**paths), "QLORA_DATA_WEIGHTS": weights,
                      "QLORA_BASE_DIR": str(tmp_path / "ml")})
    assert message.format(**paths) in str(exc.value)


def test_weights_are_normalised_and_each_source_is_stripped(sources, tmp_path):
    a, b = sources
    cfg = parse_config({"QLORA_DATA": f" {a} , {b} ", "QLORA_DATA_WEIGHTS": "7, 3",
                        "QLORA_BASE_DIR": str(tmp_path / "ml")})
    assert cfg.data_sources == [str(a), str(b)] and cfg.data_mix_weights == pytest.approx([0.7, 0.3])
    assert parse_config({"QLORA_DATA": f"{a},{b}", "QLORA_BASE_DIR": str(tmp_path)}).data_mix_weights is None


def test_bad_weights_fail_the_job_in_its_first_seconds_with_exit_2(sources, tmp_path):
    a, b = sources
    env = job_env(tmp_path, QLORA_DATA=f"{a},{b}", QLORA_DATA_WEIGHTS="0.5,0.3,0.2")
    proc = subprocess.run([sys.executable, "-m", "entrypoints.train"], env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == EXIT_CONFIG, proc.stdout[-2000:] + proc.stderr[-2000:]
    failure = (tmp_path / "opt-ml" / "output" / "failure").read_text()
    assert "QLORA_DATA_WEIGHTS='0.5,0.3,0.2' gives 3 weight(s) for the 2 sources of QLORA_DATA" in failure
    proc = subprocess.run([sys.executable, "-m", "entrypoints.data", f"{a},{b}", "--weights", "1"], env=env,
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == EXIT_CONFIG and "--data-weights='1' gives 1 weight(s) for the 2 sources" in proc.stderr


def _prepare(tmp_path: Path, sources: tuple[Path, Path], cache_dir: Path, **settings: str):
    from entrypoints.dataset import prepare_data
    from entrypoints.demo.assets import llama2_tokenizer
    from entrypoints.templating import load_tokenizer_and_template

    tokenizer_dir = llama2_tokenizer(cache_dir)
    cfg = parse_config({"QLORA_DATA": ",".join(map(str, sources)), "QLORA_BASE_DIR": str(tmp_path / "ml"),
                        "QLORA_MODEL": str(tokenizer_dir), "QLORA_NUM_SAMPLE_GENERATIONS": "0",
                        **{f"QLORA_{k.upper()}": v for k, v in settings.items()}})
    tokenizer, template = load_tokenizer_and_template(cfg, tokenizer_dir)
    prepared = prepare_data(cfg, list(sources), None, tokenizer, template)
    records = [tokenizer.decode(ids) for ids in prepared.train["input_ids"]]
    held = [tokenizer.decode(ids) for ids in prepared.eval["input_ids"]] if prepared.eval is not None else []
    return prepared.stats, records, held


def test_the_mix_is_drawn_by_seed_with_held_out_records_split_off_each_source(sources, tmp_path, cache_dir):
    stats, records, held = _prepare(tmp_path, sources, cache_dir, data_weights="0.5,0.5", seed="42")
    a, b = stats["mix"]
    # first_exhausted: the 57 training records of A (3 held out), about as many of B, none twice.
    assert (a["records_read"], a["train_records"], a["eval_records"]) == (60, 57, 3)
    assert 35 <= b["train_records"] <= 85 and b["weight"] == 0.5 and stats["train_records"] == len(records)
    assert sum("B question" in r for r in records) == b["train_records"] and len(set(records)) == len(records)
    assert not set(records) & set(held)  # the held-out records were split off before mixing
    assert sum("A question" in r for r in held) == 3 and stats["eval_records"] == len(held)
    again = _prepare(tmp_path, sources, cache_dir, data_weights="0.5,0.5", seed="42")
    assert again == (stats, records, held)
    other = _prepare(tmp_path, sources, cache_dir, data_weights="0.5,0.5", seed="7")
    assert other[1] != records
    # The held-out records by content (what the promotion gate compares eval losses over): the same for the same
    # seed, other for another seed's held-out records.
    assert len(stats["eval_records_sha256"]) == 64
    assert other[0]["eval_records_sha256"] != stats["eval_records_sha256"] and other[2] != held
    # all_exhausted: the small source repeats until every record of the large one was drawn.
    stats, records, _ = _prepare(tmp_path, sources, cache_dir, data_weights="1,1", data_mix_stopping="all_exhausted",
                                 eval_fraction="0")
    a, b = stats["mix"]
    assert b["train_records"] == 300 and 250 <= a["train_records"] <= 350
    assert len({r for r in records if "A question" in r}) == 60
    # No weights: every record of every source, once.
    stats, records, _ = _prepare(tmp_path, sources, cache_dir, eval_fraction="0")
    assert [(m["weight"], m["train_records"]) for m in stats["mix"]] == [(None, 60), (None, 300)]


def test_a_weighted_mix_never_trains_without_a_source_and_its_own_repeats_are_not_duplicates(tmp_path, cache_dir):
    """A source whose weight draws no record fails the job (exit 3) instead of training on the others alone; under
    all_exhausted the small sources' repeats are the mix's design, not duplicates in the data, and the held-out set
    holds each held-out record once (not the small sources' few held-out records over and over)."""
    from entrypoints.dataset import check_data_limits

    for name, records in (("big", A), ("one", A[:1]), ("few", B[:8]), ("more", B[100:108])):
        (tmp_path / name).mkdir()
        jsonl(tmp_path / name / "x.jsonl", records)
    big, one, few, more = (tmp_path / n for n in ("big", "one", "few", "more"))
    # first_exhausted, 1:1: the seed's first draw takes the one-record source, which ends the mix: nothing of `big`.
    with pytest.raises(DataError) as exc:
        _prepare(tmp_path, (big, one), cache_dir, data_weights="1,1", seed="42")
    assert exc.value.exit_code == EXIT_DATA
    assert (f"QLORA_DATA_WEIGHTS='1,1': the mix drew no training record from {big} (weight 0.5, 60 records read): it"
            f" ended after 1 record(s), when {one} (1 records read, weight 0.5) had given all of its records") in str(
        exc.value)
    # A source smaller than its held-out split is named.
    with pytest.raises(ConfigError, match=f"holds out 8 of the 8 training record\\(s\\) of the source {few}, leaving"):
        _prepare(tmp_path, (big, few), cache_dir, eval_fraction="0.95")
    # all_exhausted over a large and two small sources: two thirds of the mix are the small ones' repeats.
    stats, records, held = _prepare(tmp_path, (big, few, more), cache_dir, data_weights="1,1,1", seed="42",
                                    data_mix_stopping="all_exhausted", eval_fraction="0.2")
    counts = {r["source"]: (r["train_records"], r["train_repeats"], r["eval_records"]) for r in stats["mix"]}
    assert counts[str(big)][1] == 0 and counts[str(few)][1] == counts[str(few)][0] - 6 > 30
    assert stats["train_mix_repeats"] == stats["train_duplicate_prompts"] > 0.5 * stats["train_records"]
    check_data_limits(stats, 512, 0.5, 0.5, "1,1,1", "all_exhausted")  # no duplicate in the data itself
    assert sorted(held) == sorted(set(held)) and [c[2] for c in counts.values()] == [12, 2, 2]
    # A duplicate in the data is still one: over the limit with the repeats left out.
    with pytest.raises(DataError, match=r"repeat the prompt of an earlier record exactly \(besides the \d+ repeats"):
        check_data_limits({**stats, "train_duplicate_prompts": stats["train_duplicate_prompts"] + 100}, 512, 0.5, 0.5)


def test_eval_records_whose_prompt_is_trained_on_in_another_source_are_counted_and_warned_about(
        sources, tmp_path, cache_dir, caplog):
    """The held-out split keeps records apart, not their copies: records in two sources can be held out of one and
    trained on from the other, and the eval loss then partly measures training data."""
    a, _ = sources
    (tmp_path / "overlap").mkdir()
    jsonl(tmp_path / "overlap" / "x.jsonl", B[:40] + A[:30])
    stats, _, held = _prepare(tmp_path, sources, cache_dir, eval_fraction="0.2")
    assert stats["eval_prompts_in_train"] == 0 and "repeat the prompt of a training record" not in caplog.text
    stats, records, held = _prepare(tmp_path, (a, tmp_path / "overlap"), cache_dir, eval_fraction="0.2")
    shared = sum(h in records for h in held)
    assert stats["eval_prompts_in_train"] == shared > 0
    assert f"{shared} of the {len(held)} eval records repeat the prompt of a training record" in caplog.text


def test_the_data_report_prints_a_mix_that_draws_nothing_from_a_source_then_exits_3(tmp_path, cache_dir):
    from entrypoints.demo.assets import llama2_tokenizer

    for name, records in (("big", A), ("one", A[:1])):
        (tmp_path / name).mkdir()
        jsonl(tmp_path / name / "x.jsonl", records)
    env = job_env(tmp_path, QLORA_MODEL=str(llama2_tokenizer(cache_dir)), HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.run([sys.executable, "-m", "entrypoints.data", f"{tmp_path / 'big'},{tmp_path / 'one'}",
                           "--weights", "1,1", "--seed", "42", "--report"], env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == EXIT_DATA, proc.stderr[-2000:]
    assert [m["train_records"] for m in json.loads(proc.stdout)["report"]["mix"]] == [0, 1]
    assert "QLORA_DATA_WEIGHTS='1,1': the mix drew no training record from" in proc.stderr


def test_the_data_fingerprint_covers_every_source_and_the_weights(sources, tmp_path):
    from entrypoints.train import Inputs, content_fingerprints

    a, b = sources
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")

    def fingerprint(paths: list[Path], weights: list[float] | None, stopping: str = "first_exhausted") -> str:
        inputs = Inputs(paths, None, model, [sorted(p.iterdir()) for p in paths])
        return content_fingerprints(inputs, tmp_path, weights, stopping)["data_sha256"]

    one = fingerprint([a], None)
    assert one == fingerprint([a], None)  # one source: the fingerprint it always had
    mix = fingerprint([a, b], [0.7, 0.3])
    assert len({one, mix, fingerprint([a, b], [0.5, 0.5]), fingerprint([b, a], [0.7, 0.3]),
                fingerprint([a, b], None), fingerprint([a, b], [0.7, 0.3], "all_exhausted")}) == 6
    # A checkpoint of the mix is not resumed by a run with other weights: refused like changed data.
    cfg = parse_config({"QLORA_DATA": f"{a},{b}", "QLORA_DATA_WEIGHTS": "0.7,0.3", "QLORA_BASE_DIR": str(tmp_path)})
    batch = {"rows": 4, "accumulation": 4, "processes": 1}
    checkpoint = tmp_path / "checkpoints" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "optimizer.pt"):
        (checkpoint / name).write_text("x")
    mark_complete(checkpoint, 5, run_fingerprint(cfg.to_public_dict(), {"data_sha256": mix}, batch))
    assert latest_complete(checkpoint.parent, run_fingerprint(cfg.to_public_dict(), {"data_sha256": mix}, batch))
    other = run_fingerprint(cfg.to_public_dict(), {"data_sha256": fingerprint([a, b], [0.5, 0.5])}, batch)
    with pytest.raises(ConfigError, match="data_sha256 differ"):
        latest_complete(checkpoint.parent, other)


BUCKET = "s3://qlora-job-123456789012-us-east-1"
MIX = ["--instance", "g5.2xlarge", "--set", f"data={BUCKET}/data/new,{BUCKET}/data/replay/old.jsonl.gz",
       "--set", "data_weights=0.7,0.3", "--set", f"output={BUCKET}/output/run", "--set", "max_steps=10",
       "--set", f"model={BUCKET}/models/llama/", "--dry-run"]


def test_the_launcher_submits_a_mix_for_the_job_to_read_itself_on_both_backends(capsys):
    assert submit.main(MIX) == 0
    out, err = capsys.readouterr()
    request = json.loads(out)["CreateTrainingJob"]
    # The model prefix is still a channel; the sources of a mix are not (the job reads each from S3 itself): each
    # taken as the job takes it, a URI that names no data file as its prefix.
    assert [c["ChannelName"] for c in request["InputDataConfig"]] == ["model"]
    env = request["Environment"]
    assert env["QLORA_DATA"] == f"{BUCKET}/data/new/,{BUCKET}/data/replay/old.jsonl.gz"
    assert env["QLORA_DATA_WEIGHTS"] == "0.7,0.3"
    assert f"QLORA_DATA={BUCKET}/data/new is taken as the prefix {BUCKET}/data/new/" in err
    assert submit.main([*MIX, "--backend", "kubernetes", "--format", "json"]) == 0
    container = json.loads(capsys.readouterr().out)["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["QLORA_DATA"] == f"{BUCKET}/data/new/,{BUCKET}/data/replay/old.jsonl.gz"
    assert env["QLORA_DATA_WEIGHTS"] == "0.7,0.3"


@pytest.mark.parametrize(("change", "message"), [
    (["--set", "data_weights=0.7"], "QLORA_DATA_WEIGHTS='0.7' gives 1 weight(s) for the 2 sources of QLORA_DATA"),
    (["--set", "data_weights=0.7,zero"], "'zero' is not a positive number"),
    (["--set", f"data={BUCKET}/data/new,data/local/"], "QLORA_DATA='data/local/': a remote job reads its data from S3"),
])
def test_the_launcher_refuses_a_bad_mix_before_sending_anything(capsys, change, message):
    assert submit.main([*MIX, *change]) == EXIT_CONFIG
    assert message in capsys.readouterr().err
