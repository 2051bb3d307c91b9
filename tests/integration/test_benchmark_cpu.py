"""The throughput benchmark end to end on CPU (tiny shape): the standard recipe and the job's path on the same samples."""

from __future__ import annotations

import json

from entrypoints.bench import throughput as benchmark


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
    # Every run's first optimizer step apart (it holds the compilation on a GPU), and no compile cache on a CPU.
    for run in runs.values():
        assert 0 < run["first_step_seconds"] <= run["train_seconds"] and run["compile_cache_loaded"] is False
    assert "BENCHMARK_JSON" in capsys.readouterr().out


def test_benchmark_runs_trl_best_in_its_own_process_and_skips_a_missing_peer(tmp_path):
    """The peers train the same samples in a process of their own (Unsloth and Liger patch transformers), with their
    versions recorded; a peer that is not installed is skipped with a reason, not failed."""
    out = tmp_path / "bench.json"
    code = benchmark.main(["--shape", "tiny", "--device", "cpu", "--samples", "12", "--max-length", "96",
                           "--runs", "trl-best,unsloth", "--unsloth-path", str(tmp_path / "none"),
                           "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    runs = {r["run"]: r for r in report["runs"]}
    assert runs["trl-best"]["tokens"] == report["data"]["train_tokens"]  # the same samples, all of them trained
    assert 0 < runs["trl-best"]["trained_tokens"] < runs["trl-best"]["tokens"]  # the answers only (assistant masks)
    assert runs["trl-best"]["versions"]["trl"] != "absent" and "BFD packing" in runs["trl-best"]["settings"]
    assert runs["trl-best"]["first_step_seconds"] > 0 and runs["trl-best"]["compile_cache_loaded"] is False
    assert runs["unsloth"]["skipped"].startswith("not installed") and "error" not in runs["unsloth"]
