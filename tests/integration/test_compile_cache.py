"""The compile cache across processes: one process compiles and saves through the job's own paths (the checkpoint
callback, a local store, an S3 store on a real S3 server), another one with an empty TORCHINDUCTOR_CACHE_DIR (a new
container) loads the artifact and compiles from it: inductor's FX graph cache and AOTAutograd's cache report hits,
where a process without it misses (torch's own counters, not timing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from entrypoints import compile_cache
from entrypoints.checkpoints import MARKER

from ..conftest import REPO


def _run(mode: str, work, inductor_dir, stores, server) -> tuple[dict, str]:
    env = {**os.environ, **server.env(), "QLORA_S3_ENDPOINT_URL": server.endpoint, "PYTHONPATH": str(REPO),
           "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "tests.compile_cache_proc", mode, str(work), *stores], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), output


def test_a_new_process_compiles_from_the_saved_artifacts(tmp_path, s3_env):
    server, bucket = s3_env
    (tmp_path / "a-file").write_text("not a directory")
    s3_store = f"s3://{bucket}/checkpoints/compile-cache"
    stores = [str(tmp_path / "store"), s3_store, str(tmp_path / "a-file" / "store")]
    saved, output = _run("save", tmp_path, tmp_path / "inductor-first", stores, server)
    assert saved["counters"]["fxgraph_cache_miss"] >= 1  # it compiled from scratch

    # The checkpoint's compile cache was complete on disk when its COMPLETE marker was written, not after.
    assert saved["at_mark_complete"] == {"cache_file": True, "key": saved["key"], "marker_yet": False}
    checkpoint = tmp_path / "checkpoints" / "checkpoint-1"
    assert (checkpoint / MARKER).is_file() and (checkpoint / compile_cache.CHECKPOINT_FILE).is_file()
    assert f"compile cache: saved 3 artifacts (0.3 MB) to {checkpoint / compile_cache.CHECKPOINT_FILE}" in output

    # Each store got one write: the second save of the same artifacts was skipped. The store that cannot be written
    # (a path below a file) is a warning line per save, never an error; nothing half-written stays behind.
    assert [s["to"] for s in saved["saved"]] == [str(tmp_path / "store" / f"torch-compile-{saved['key']}.bin"),
                                                 f"{s3_store}/torch-compile-{saved['key']}.bin"]
    assert output.count("already holds these 3 artifacts: not saved again") == 2
    assert output.count(f"could not save to {tmp_path / 'a-file' / 'store'}") == 2
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [f"torch-compile-{saved['key']}.bin"]
    header, _ = compile_cache.decode((tmp_path / "store" / f"torch-compile-{saved['key']}.bin").read_bytes())
    assert header["key"] == saved["key"] and header["artifacts"] == {"inductor": 2, "aot_autograd": 1}

    loaded, output = _run("load", tmp_path, tmp_path / "inductor-second", [s3_store], server)
    # Resumed from the checkpoint: loaded, and the compilation found everything in the cache.
    assert loaded["checkpoint_loaded"] is True
    assert loaded["checkpoint_counters"]["fxgraph_cache_hit"] == 2 and loaded["checkpoint_counters"]["autograd_cache_hit"] == 1
    assert "fxgraph_cache_miss" not in loaded["checkpoint_counters"]
    # A rerun on another empty cache directory, from the S3 store: the same.
    assert loaded["store_loaded"] is True and loaded["store_record"]["loaded_from"].startswith(s3_store)
    assert loaded["store_counters"]["fxgraph_cache_hit"] == 2 and "fxgraph_cache_miss" not in loaded["store_counters"]
    assert f"compile cache: loaded 3 artifacts (0.3 MB) from {s3_store}/torch-compile-" in output


def test_the_trainer_loads_the_resumed_checkpoints_cache_and_saves_one_with_each_checkpoint(tiny_model, tmp_path,
                                                                                            monkeypatch, caplog):
    """build_trainer's wiring, on the tiny model without a forward pass (the job compiles on CUDA only, so the decision
    to compile is forced here): the cache is keyed on this model and plan, the checkpoint the run resumes from is read
    before anything runs, and the checkpoint callback hands every checkpoint to the cache before marking it complete."""
    import logging

    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerState

    from entrypoints import modeling, perf
    from entrypoints.bench import throughput as benchmark
    from entrypoints.checkpoints import StopFlag
    from entrypoints.dataset import TokenizedData
    from entrypoints.tracking import NullTracker
    from entrypoints.trainer import build_trainer

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(perf, "wants_compile", lambda *args, **kwargs: True)
    resume = tmp_path / "checkpoints" / "checkpoint-2"
    resume.mkdir(parents=True)
    theirs = {"torch": "2.10.0+cu128", "device": "NVIDIA A10G (compute capability 8.6)"}
    (resume / compile_cache.CHECKPOINT_FILE).write_bytes(compile_cache.encode(b"never loaded", theirs, {}))
    cfg = benchmark.job_config(tiny_model, tmp_path, 64, 0, {"max_steps": "3", "compile_cache": str(tmp_path / "cc"),
                                                             "checkpoint_dir": str(tmp_path / "checkpoints")})
    model = modeling.load_model(tiny_model, cfg, 0)
    data = TokenizedData(Dataset.from_dict(benchmark.synthetic_chat(8, 32000, 64, seed=0)), None, [])
    trainer = build_trainer(cfg, model, AutoTokenizer.from_pretrained(tiny_model), data, NullTracker(), StopFlag(),
                            None, {}, resume=resume)
    cache = compile_cache.of(trainer)
    assert cache is not None and cache.setting == str(tmp_path / "cc") and cache.loaded is None
    layers = model.config.num_hidden_layers
    assert cache.parts["recomputed_layers"] == f"0-{layers - 1}"  # without a plan every layer is recomputed
    assert cache.parts["compute_dtype"] == "bfloat16" and cache.parts["lora"].startswith(f"r={cfg.lora_r} ")
    messages = [r.getMessage() for r in caplog.records if r.name == "qlora.compile_cache"]
    assert messages[0].startswith(f"compile cache: {resume / compile_cache.CHECKPOINT_FILE} not loaded: it was made for"
                                  " another setup (")
    assert messages[1] == f"compile cache: none for this key ({cache.key}) at {cache.store_uri}"

    # A checkpoint the Trainer has written: the cache is asked to save into it before the COMPLETE marker. Nothing
    # was compiled in this process, so there is nothing to save, and the checkpoint is complete all the same.
    saved = tmp_path / "checkpoints" / "checkpoint-3"
    saved.mkdir()
    checkpointer = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "CheckpointCallback")
    checkpointer.on_save(trainer.args, TrainerState(global_step=3, max_steps=3), None)
    assert (saved / MARKER).is_file()
    assert f"compile cache: nothing to save to {saved / compile_cache.CHECKPOINT_FILE}" in caplog.text
