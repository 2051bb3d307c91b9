"""One process of the compile-cache tests (tests/integration/test_compile_cache.py): a fresh interpreter with its own
TORCHINDUCTOR_CACHE_DIR, as a new container has.

    python -m tests.compile_cache_proc save WORK STORE [STORE ...]   # compile, save to a checkpoint and the stores
    python -m tests.compile_cache_proc load WORK STORE                # load (checkpoint, then STORE), compile again

The module compiled is the smallest that exercises the real path: a user-defined module (Dynamo skips torch's own
modules as frames of their own) compiled in place with dynamic shapes, as perf.compile_layers compiles decoder layers,
run forward and backward twice. Bias-free linear layers only: inductor then calls the matmul kernels it has and writes
no C++ kernel, so a compilation takes a second on a CPU instead of a C++ build. The last stdout line is a JSON report.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

PARTS_TRAINING = {"lora": "test", "attention": "sdpa", "activation_offload": False, "fsdp": False}


def build():
    import torch

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = torch.nn.Linear(8, 16, bias=False)
            self.down = torch.nn.Linear(16, 8, bias=False)

        def forward(self, x):
            return self.down(self.up(x))

    torch.manual_seed(0)
    block = Block()
    block.compile(dynamic=True)
    return block


def train_steps(block) -> None:
    import torch

    for rows in (3, 5):
        block(torch.randn(rows, 8, requires_grad=True)).sum().backward()


def counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {k: int(v) for group in ("inductor", "aot_autograd") for k, v in counters[group].items()
            if k.startswith(("fxgraph_cache", "autograd_cache"))}


def cache_for(setting: str):
    from entrypoints import compile_cache

    parts = compile_cache.key_parts({"model_type": "test", "hidden_size": 8}, "float32", [], PARTS_TRAINING)
    return compile_cache.CompileCache(setting, parts, endpoint_url=_endpoint())


def _endpoint() -> str:
    import os

    return os.environ.get("QLORA_S3_ENDPOINT_URL", "")


def save(work: Path, stores: list[str]) -> dict:
    """Compile, then save through the job's own paths: the checkpoint callback's on_save (the compile cache written
    before the COMPLETE marker: recorded by a wrapper of mark_complete), and each store."""
    from transformers import TrainerState

    from entrypoints import checkpoints, compile_cache
    from entrypoints.checkpoints import StopFlag, trainer_callback

    block = build()
    train_steps(block)
    report: dict = {"counters": counters()}
    checkpoint = work / "checkpoints" / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_model.safetensors").write_bytes(b"stand-in for the Trainer's files")
    real_mark_complete = checkpoints.mark_complete

    def mark_complete(path, *args, **kwargs):
        cached = path / compile_cache.CHECKPOINT_FILE
        header = compile_cache.decode(cached.read_bytes())[0] if cached.is_file() else None
        report["at_mark_complete"] = {"cache_file": cached.is_file(), "key": header and header["key"],
                                      "marker_yet": (path / checkpoints.MARKER).exists()}
        return real_mark_complete(path, *args, **kwargs)

    checkpoints.mark_complete = mark_complete
    cache = cache_for("auto")
    callback = trainer_callback(StopFlag(), "", "", {"test": 1}, before_complete=cache.save_to_checkpoint)
    callback.on_save(SimpleNamespace(output_dir=str(checkpoint.parent), world_size=1),
                     TrainerState(global_step=1, max_steps=2), None)
    report["checkpoint"] = str(checkpoint)
    report["key"] = cache.key
    report["saved"] = []
    for store in stores:
        store_cache = cache_for(store)
        store_cache.save_to_store("after step 2")
        store_cache.save_to_store("at the end of training")  # the same artifacts: not written again
        report["saved"] += store_cache.saved
    return report


def load(work: Path, store: str) -> dict:
    """Load from the checkpoint (a resumed run), compile: hits; then, with another empty cache directory and Dynamo
    reset, load from the store (a scheduled rerun) and compile again: hits."""
    import torch
    from torch._dynamo.utils import counters as torch_counters
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    report: dict = {}
    resumed = cache_for("auto")
    report["checkpoint_loaded"] = resumed.load(work / "checkpoints" / "checkpoint-1")
    train_steps(build())
    report["checkpoint_counters"], report["checkpoint_record"] = counters(), resumed.record()
    torch._dynamo.reset()
    torch_counters.clear()
    with temporary_cache_dir(str(work / "second-inductor-cache")):
        rerun = cache_for(store)
        report["store_loaded"] = rerun.load(None)
        train_steps(build())
        report["store_counters"], report["store_record"] = counters(), rerun.record()
    return report


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")
    mode, work, stores = argv[0], Path(argv[1]), argv[2:]
    report = save(work, stores) if mode == "save" else load(work, stores[0])
    print(json.dumps(report, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
