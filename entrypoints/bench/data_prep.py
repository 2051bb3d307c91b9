"""Data preparation benchmark: rows per second and peak memory of the job's own data step on a large file.

    python -m entrypoints.bench.data_prep --rows 1000000     # writes ~1 GB of chat JSONL, then prepares it

It writes a JSONL file of `messages` records (about 1 KB each), then runs `entrypoints.dataset.prepare_data`
on it exactly as the job does (stream -> normalise -> Arrow cache files -> tokenize with the chat template
and assistant masks on every core -> token statistics), with the real Llama 2 tokenizer. A sampler thread
records the memory of the whole process tree (the tokenizing workers too) while it runs. The last stdout
line is `DATA_BENCHMARK {json}` for tests and scripts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULT_PREFIX = "DATA_BENCHMARK "
WORDS = ("river mountain harbour lantern copper meadow signal orchard thunder velvet granite compass ember"
         " willow falcon quartz beacon saffron glacier prairie").split()


def write_dataset(path: Path, rows: int, seed: int = 0) -> int:
    """Write `rows` chat records of about 1 KB each; returns the file size in bytes."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            question = " ".join(rng.choices(WORDS, k=40))
            answer = " ".join(rng.choices(WORDS, k=100))
            record = {"messages": [{"role": "system", "content": f"You answer questions about record {i}."},
                                   {"role": "user", "content": question},
                                   {"role": "assistant", "content": answer}]}
            fh.write(json.dumps(record) + "\n")
    return path.stat().st_size


def _anon_bytes(pid: int) -> int:
    """Anonymous resident memory (heap, not file pages): what a container's memory limit really has to hold.
    Arrow cache files are memory-mapped, so plain RSS also counts file pages the kernel can drop at will."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemorySampler:
    """Peak memory while a block runs: RSS of this process, and anonymous memory of it plus its children
    (the tokenizing workers), sampled every `interval_seconds`."""

    def __init__(self, interval_seconds: float = 0.1):
        import psutil

        self.proc = psutil.Process()
        self.interval_seconds = interval_seconds
        self.baseline_rss_bytes = self.proc.memory_info().rss
        self.baseline_anon_bytes = _anon_bytes(self.proc.pid)
        self.peak_rss_bytes = self.baseline_rss_bytes
        self.peak_tree_anon_bytes = self.baseline_anon_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def _sample(self) -> None:
        import psutil

        self.peak_rss_bytes = max(self.peak_rss_bytes, self.proc.memory_info().rss)
        try:
            children = self.proc.children(recursive=True)
        except psutil.Error:
            children = []
        total = _anon_bytes(self.proc.pid) + sum(_anon_bytes(c.pid) for c in children)
        self.peak_tree_anon_bytes = max(self.peak_tree_anon_bytes, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_seconds)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def run(rows: int, work: Path, tokenizer_dir: Path, keep: bool = False) -> dict:
    from entrypoints.config import parse_config
    from entrypoints.dataset import prepare_data
    from entrypoints.templating import load_tokenizer_and_template

    data = work / "data" / "train.jsonl"
    started = time.monotonic()
    data_bytes = write_dataset(data, rows)
    write_seconds = time.monotonic() - started

    cfg = parse_config({"QLORA_DATA": str(data), "QLORA_BASE_DIR": str(work / "opt-ml"),
                        "QLORA_EVAL_FRACTION": "0.001", "QLORA_NUM_SAMPLE_GENERATIONS": "2",
                        "QLORA_MAX_SEQ_LENGTH": "512"})
    tokenizer, template = load_tokenizer_and_template(cfg, tokenizer_dir)  # as the job loads them
    with MemorySampler() as mem:
        started = time.monotonic()
        prepared = prepare_data(cfg, data, None, tokenizer, template)
        seconds = time.monotonic() - started
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    result = {
        "rows": rows, "data_bytes": data_bytes, "write_seconds": round(write_seconds, 1),
        "prepare_seconds": round(seconds, 1), "rows_per_second": round(rows / seconds, 1),
        "train_records": prepared.stats["train_records"], "train_tokens": prepared.stats["train_tokens"],
        "baseline_rss_mib": round(mem.baseline_rss_bytes / 2**20, 1),
        "peak_rss_mib": round(mem.peak_rss_bytes / 2**20, 1),
        "peak_rss_growth_mib": round((mem.peak_rss_bytes - mem.baseline_rss_bytes) / 2**20, 1),
        "baseline_anon_mib": round(mem.baseline_anon_bytes / 2**20, 1),
        "peak_tree_anon_mib": round(mem.peak_tree_anon_bytes / 2**20, 1),
        "peak_anon_growth_mib": round((mem.peak_tree_anon_bytes - mem.baseline_anon_bytes) / 2**20, 1),
        "cores": cores,
    }
    if not keep:
        shutil.rmtree(work / "data", ignore_errors=True)
        shutil.rmtree(work / "opt-ml", ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m entrypoints.bench.data_prep", description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--work-dir", type=Path, default=None, help="where the JSONL and the Arrow cache go (default: a temp dir)")
    ap.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer directory (default: the Llama 2 tokenizer)")
    ap.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="where the Llama 2 tokenizer is built once")
    ap.add_argument("--keep", action="store_true", help="keep the generated data and cache files")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("datasets").setLevel(logging.WARNING)
    if args.tokenizer is None:
        from entrypoints.demo.assets import llama2_tokenizer

        args.cache_dir.mkdir(parents=True, exist_ok=True)
        args.tokenizer = llama2_tokenizer(args.cache_dir)
    if args.work_dir is None:
        with tempfile.TemporaryDirectory(prefix="data-bench-") as tmp:
            result = run(args.rows, Path(tmp), args.tokenizer, args.keep)
    else:
        result = run(args.rows, args.work_dir, args.tokenizer, args.keep)
    print(f"rows: {result['rows']}  data: {result['data_bytes'] / 2**20:.0f} MiB  prepare: {result['prepare_seconds']} s"
          f"  -> {result['rows_per_second']} rows/s on {result['cores']} core(s)")
    print(f"memory: main process RSS {result['baseline_rss_mib']} -> peak {result['peak_rss_mib']} MiB"
          f" (+{result['peak_rss_growth_mib']} MiB, file pages of the Arrow cache included); anonymous memory of the"
          f" process tree {result['baseline_anon_mib']} -> peak {result['peak_tree_anon_mib']} MiB"
          f" (+{result['peak_anon_growth_mib']} MiB)")
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
