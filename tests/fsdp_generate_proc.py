"""One rank of tests/integration/test_fsdp_generation.py, started by torchrun with gloo on CPU: the tiny model
sharded by FSDP2 (torch's fully_shard, every decoder layer and the whole model), answering prompts through the job's
evaluation.generate_answers with the automatic batch size, which differs between the ranks here (3 prompts on rank
0, 2 on rank 1: free GPU memory is never the same on two GPUs).

    python -m torch.distributed.run --standalone --nproc-per-node=2 -m tests.fsdp_generate_proc MODEL_DIR answer|oom OUT

Each rank writes OUT/rank-<rank>.json: `answer`: the answers and the batch sizes generate saw; `oom` (every generate
call runs out of GPU memory, as on ranks with equal memory): the error's exit code and message.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(model_dir: str, mode: str, out: str) -> int:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from entrypoints import evaluation
    from entrypoints.errors import JobError
    from entrypoints.suites import SuiteItem

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    items = [SuiteItem(f"s.jsonl:{i}", None, f"Question number {i}?" + " more" * i, "yes", "contains")
             for i in range(5)]
    evaluation.auto_generation_batch = lambda *args: 3 if rank == 0 else 2
    real_generate, sizes = model.generate, []

    def generate(**kwargs):
        sizes.append(len(kwargs["input_ids"]))
        if mode == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_generate(**kwargs)

    model.generate = generate
    try:
        answers = evaluation.generate_answers(model, tok, None, items, 3, batch_size=0, what="eval suite s")
    except JobError as exc:
        report = {"exit_code": exc.exit_code, "error": str(exc), "sizes": sizes}
    else:
        report = {"answers": answers, "sizes": sizes}
    (Path(out) / f"rank-{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
