"""A model sharded by FSDP2 over two ranks (gloo on CPU; the job refuses FSDP on CPU, these check its parts: the
job's loading, LoRA, the sharding its plan asks for, its answers).

Answers: every rank takes part in every
forward pass, so the ranks must make the same generate calls. The automatic batch size follows each GPU's own free
memory; the ranks agree on the smallest. Before, rank 0 answered in batches of 3 and rank 1 in batches of 2: rank 0
left generation while rank 1 still gathered weights for its third batch (a crash here; in the job its gathers would
pair with rank 0's next collectives). A batch that runs out of memory cannot be retried by one rank alone: exit 2 with
the setting that fixes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ..conftest import REPO


def _ranks(tiny_model, mode: str, out) -> tuple[dict[int, dict], str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "tests.fsdp_proc", str(tiny_model), mode, str(out)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return {rank: json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)}, output


def test_sharded_ranks_answer_in_the_same_batches(tiny_model, tmp_path):
    reports, output = _ranks(tiny_model, "answer", tmp_path)
    assert reports[0]["sizes"] == reports[1]["sizes"] == [2, 2, 1]  # the smaller of the two sizes, on both ranks
    assert reports[0]["answers"] == reports[1]["answers"] and len(reports[0]["answers"]) == 5


def test_a_sharded_batch_out_of_memory_names_the_setting_instead_of_retrying_alone(tiny_model, tmp_path):
    reports, output = _ranks(tiny_model, "oom", tmp_path)
    for report in reports.values():  # one attempt, then exit 2 naming the setting (no retry of one rank alone)
        assert report["sizes"] == [2] and report["exit_code"] == 2, output[-4000:]
        assert "2 prompts at once ran out of GPU memory on this rank of a sharded (FSDP) run" in report["error"]
        assert "QLORA_GENERATION_BATCH_SIZE=1" in report["error"]


def test_a_prequantized_base_shards_and_trains_as_one_process(tiny_model_nf4, tmp_path):
    """A published bnb 4-bit checkpoint through the job's loading (packed weights kept in the compute dtype so that
    FSDP can shard them) is sharded by fully_shard: each rank holds half of every 4-bit weight, and the loss, the LoRA
    gradients and the greedy answers are those of the unsharded model."""
    reports, output = _ranks(tiny_model_nf4, "prequantized", tmp_path)
    for rank, r in reports.items():
        assert r["weight_elements_on_this_rank"] * 2 == r["weight_elements"] and r["weight_dtype"] == "torch.bfloat16"
        assert abs(r["loss"][0] - r["loss"][1]) < 1e-3 * abs(r["loss"][0]), (rank, r["loss"])
        assert r["lora_tensors"] == 28 and r["grad_max"] > 0
        assert r["grad_max_difference"] <= 0.02 * r["grad_max"], (rank, r["grad_max_difference"], r["grad_max"])
        assert r["answers"][0] == r["answers"][1] and len(r["answers"][0]) == 3
    assert reports[0]["answers"] == reports[1]["answers"]
