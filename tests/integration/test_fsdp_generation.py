"""Answers of a model sharded by FSDP over two ranks (gloo on CPU, the tiny model): every rank takes part in every
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
                           "-m", "tests.fsdp_generate_proc", str(tiny_model), mode, str(out)], env=env,
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
