"""The training job: QLoRA SFT of a Llama-class model, configured by QLORA_* variables.

    python -m entrypoints.train [--name value ...]      # what the container's `train` command runs

Steps (main -> run): resolve secrets and the output location -> fetch data and model -> tokenize ->
load the 4-bit model -> eval + sample answers before -> train (resuming from the newest complete
checkpoint) -> eval + sample answers after -> save the adapter -> merge -> model card + manifest ->
publish (manifest last) -> print a summary. Exit codes: entrypoints/errors.py and the README.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from entrypoints import perf, storage
from entrypoints.checkpoints import (
    StopFlag,
    latest_complete,
    remove_incomplete,
    restore_from_uri,
    settings_fingerprint,
    trainer_callback,
)
from entrypoints.config import JobConfig, parse_config
from entrypoints.data import LoadStats, list_data_files, load_conversations
from entrypoints.errors import EXIT_INTERNAL, EXIT_PREEMPTED, ConfigError, DataError, JobError, Preempted, run_guarded
from entrypoints.outputs import (
    OutputClaim,
    OutputTarget,
    Publisher,
    build_manifest,
    fingerprint_files,
    write_model_card,
)
from entrypoints.paths import DEFAULT_BASE_DIR, container_paths
from entrypoints.secrets import install_redactor, resolve_secrets
from entrypoints.tracking import NullTracker, WandbTracker, wandb_wanted

log = logging.getLogger("qlora")
SUMMARY_PREFIX = "QLORA_SUMMARY "  # the last stdout line: one JSON object a caller can parse
# How long a rank waits for its host's local rank 0 to download the inputs and build the data caches (or for
# world rank 0 to check the output). Long on purpose: a 70B model or millions of records take a while, and a
# leader that dies is not waited for (torchrun stops the other ranks when one exits with an error).
RANK_WAIT_TIMEOUT = timedelta(hours=4)
T = TypeVar("T")


@dataclass
class Inputs:
    data: Path
    eval_data: Path | None
    model_dir: Path
    data_files: list[Path]


@dataclass
class Prepared:
    train: Any
    eval: Any | None
    samples: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- ranks
class RankFailed(JobError):
    """Another rank's failure, raised here too so that every rank stops with the same exit code and message."""

    def __init__(self, exit_code: int, kind: str, message: str):
        super().__init__(message)
        self.exit_code, self.kind = exit_code, kind


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun launch (one process per GPU); a plain process is rank 0 of 1.

    Who does what: local rank 0 of each host downloads the inputs, builds the data caches and tidies the local
    checkpoint directory while the host's other ranks wait, then they reuse its files; world rank 0 alone
    checks the output location, opens the W&B run, generates the sample answers and writes the outputs.
    Everything else (loading the model, eval, training) runs on every rank.
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    group: Any = None  # a gloo group for the waits above: its own long timeout, apart from training's collectives

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def host_leader(self) -> int:
        return self.rank - self.local_rank  # torchrun numbers the ranks of one host contiguously

    def from_local_main(self, fn: Callable[[], T], what: str) -> T:
        """Local rank 0 runs `fn`; the host's other ranks wait and get its result (or fail with its error)."""
        return self._lead(fn, what, self.is_local_main, self.host_leader)

    def from_main(self, fn: Callable[[], T], what: str) -> T:
        """World rank 0 runs `fn`; every other rank waits and gets its result (or fails with its error)."""
        return self._lead(fn, what, self.is_main, 0)

    def local_main_first(self, fn: Callable[[], T], what: str) -> T:
        """Local rank 0 runs `fn` first; the host's other ranks run it once it has finished (reusing its files)."""
        if self.world_size == 1:
            return fn()
        result = self._lead(fn, what, self.is_local_main, self.host_leader)
        return result if self.is_local_main else fn()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.group)
        return values

    def _lead(self, fn: Callable[[], T], what: str, leading: bool, leader: int) -> T:
        if self.world_size == 1:
            return fn()
        outcome: tuple[str, Any] | None = None
        error: BaseException | None = None
        if leading:
            try:
                outcome = ("ok", fn())
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the waiting ranks have been told
                error = exc
                outcome = ("error", _describe(exc))
        else:
            log.info("waiting for rank %d: %s", leader, what)
        status, value = self.gather(outcome)[leader]
        if error is not None:
            raise error
        if status == "error":
            exit_code, kind, message = value
            log.error("rank %d failed during %s; stopping with its error", leader, what)
            raise RankFailed(exit_code, kind, message)
        return value


def _describe(exc: BaseException) -> tuple[int, str, str]:
    if isinstance(exc, JobError):
        return exc.exit_code, exc.kind, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_PREEMPTED, "preempted", "interrupted before a checkpoint could be saved; rerun to resume"
    return EXIT_INTERNAL, "internal error", f"{type(exc).__name__}: {exc}"


def join_ranks(env: Mapping[str, str]) -> Ranks:
    """Start the process group when torchrun launched several processes; a plain process gets rank 0 of 1."""
    if int(env.get("WORLD_SIZE", "1") or "1") <= 1:
        return Ranks()
    import torch.distributed as dist
    from accelerate import PartialState
    from transformers import TrainingArguments

    from entrypoints.modeling import device_kind

    # The process group the Trainer would start later, started now so the steps before it can wait for each
    # other: the same accelerate state with the arguments TrainingArguments passes (use_cpu off CUDA, gloo; its
    # ddp_timeout on CUDA, NCCL). The Trainer finds the group initialized and uses it.
    cuda = device_kind() == "cuda"
    state = PartialState(cpu=not cuda, **({"timeout": timedelta(seconds=TrainingArguments.ddp_timeout)} if cuda else {}))
    group = dist.new_group(backend="gloo", timeout=RANK_WAIT_TIMEOUT)
    ranks = Ranks(state.num_processes, state.process_index, state.local_process_index, group)
    log.info("rank %d of %d (local rank %d, backend %s)", ranks.rank, ranks.world_size, ranks.local_rank, state.backend)
    return ranks


# ------------------------------------------------------------------------------------------- steps
def resolve_inputs(cfg: JobConfig, work: Path, hf_token: str | None) -> Inputs:
    from entrypoints.modeling import resolve_model

    endpoint = cfg.s3_endpoint_url
    data = storage.fetch(cfg.data, work / "data" / "train", endpoint_url=endpoint)
    eval_data = storage.fetch(cfg.eval_data, work / "data" / "eval", endpoint_url=endpoint) if cfg.eval_data else None
    model_dir = resolve_model(cfg, work, hf_token)
    return Inputs(data, eval_data, model_dir, list_data_files(data) + (list_data_files(eval_data) if eval_data else []))


def _split_sample(conv: list[dict[str, str]] | str) -> dict[str, Any] | None:
    if isinstance(conv, str):
        return None
    last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
    question = next((m["content"] for m in reversed(conv[:last]) if m["role"] == "user"), "")
    return {"messages": conv[:last], "prompt": question, "reference": conv[last]["content"]}


def prepare_data(cfg: JobConfig, inputs: Inputs, tokenizer: Any, template: str | None,
                 fresh_cache: bool = True) -> Prepared:
    """Tokenize the data into Arrow caches. `fresh_cache=False` (a host's other ranks, after its local rank 0
    has built them) reuses the caches of this job instead of starting over."""
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError

    from entrypoints.templating import tokenize_conversation, tokenize_text

    # Arrow cache files in the job's work dir keep memory flat however large the data is. The directory is
    # emptied first: `datasets` fingerprints a generator by its code, not by the file's content, so a cache
    # left by an earlier run over changed data at the same path would otherwise be reused silently.
    cache_dir = cfg.paths.work_dir / "datasets-cache"
    if fresh_cache:
        shutil.rmtree(cache_dir, ignore_errors=True)

    def tokenized(path: Path, stats: LoadStats):
        def gen():
            for conv in load_conversations(path, cfg.data_format, cfg.max_bad_records, stats):
                yield {"record": json.dumps(conv)}
        try:
            return Dataset.from_generator(gen, cache_dir=str(cache_dir), keep_in_memory=False)
        except DatasetGenerationError as exc:
            # datasets wraps whatever the generator raised; a bad record is a data error, not a crash.
            if isinstance(exc.__cause__, JobError):
                raise exc.__cause__ from None
            raise

    def tokenize(batch):
        out: dict[str, list] = {"input_ids": [], "assistant_masks": []}
        for raw in batch["record"]:
            conv = json.loads(raw)
            if isinstance(conv, str):
                enc = tokenize_text(tokenizer, conv)
            else:
                if template is None:
                    raise DataError("chat records need a chat template, but none could be resolved")
                enc = tokenize_conversation(tokenizer, template, conv, cfg.assistant_only_loss)
            out["input_ids"].append(enc["input_ids"])
            out["assistant_masks"].append(enc["assistant_masks"])
        return out

    train_stats = LoadStats()
    train_raw = tokenized(inputs.data, train_stats)
    stats: dict[str, Any] = {"format": train_stats.fmt, "train_records_read": train_stats.records,
                             "bad_records_skipped": train_stats.skipped}
    if inputs.eval_data is not None:
        eval_stats = LoadStats()
        eval_raw = tokenized(inputs.eval_data, eval_stats)
        stats["bad_records_skipped"] += eval_stats.skipped
    elif cfg.eval_fraction > 0 and len(train_raw) >= 2:
        n_eval = max(1, round(len(train_raw) * cfg.eval_fraction))
        split = train_raw.train_test_split(test_size=n_eval, seed=cfg.seed, shuffle=True)
        train_raw, eval_raw = split["train"], split["test"]
    else:
        eval_raw = None

    samples = []
    if eval_raw is not None and cfg.num_sample_generations:
        for raw in eval_raw.select(range(min(len(eval_raw), cfg.num_sample_generations)))["record"]:
            sample = _split_sample(json.loads(raw))
            if sample:
                samples.append(sample)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    num_proc = min(cores, 8) if len(train_raw) > 20_000 and cores > 1 else None
    train_ds = train_raw.map(tokenize, batched=True, remove_columns=["record"], num_proc=num_proc, desc="tokenizing train")
    eval_ds = eval_raw.map(tokenize, batched=True, remove_columns=["record"], desc="tokenizing eval") if eval_raw is not None else None
    stats.update({"train_records": len(train_ds), "eval_records": len(eval_ds) if eval_ds is not None else 0,
                  **_token_stats(train_ds, cfg.max_seq_length)})
    if stats["train_loss_tokens"] == 0:
        raise DataError("no token is trained on: every record's answer was masked out (check the data format)")
    if fresh_cache or train_stats.records:
        log.info("data: %s", json.dumps(stats))
    else:  # the generator did not run: every split came from the caches local rank 0 built
        log.info("data: reused the Arrow caches in %s (%d train, %d eval records)", cache_dir,
                 stats["train_records"], stats["eval_records"])
    return Prepared(train_ds, eval_ds, samples, stats)


def _token_stats(ds: Any, max_seq_length: int) -> dict[str, int]:
    """Token counts by batched iteration over the Arrow table (reading whole columns would load them into RAM)."""
    import numpy as np
    import pyarrow.compute as pc

    lengths = []  # one int32 per record: 4 MB per million records
    train_tokens = loss_tokens = 0
    for batch in ds.select_columns(["input_ids", "assistant_masks"]).with_format("arrow").iter(batch_size=10_000):
        n = pc.list_value_length(batch["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
        lengths.append(n.astype(np.int32))
        train_tokens += int(np.minimum(n, max_seq_length).sum())
        loss_tokens += int(pc.sum(pc.list_flatten(batch["assistant_masks"])).as_py() or 0)
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int32)
    return {"train_tokens": train_tokens, "train_loss_tokens": loss_tokens,
            "median_tokens_per_record": int(np.sort(all_lengths)[len(all_lengths) // 2]) if len(all_lengths) else 0,
            "records_over_max_seq_length": int((all_lengths > max_seq_length).sum())}


def build_trainer(cfg: JobConfig, model: Any, tokenizer: Any, data: Prepared, tracker: Any, stop: StopFlag,
                  pad_token: str):
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from entrypoints.modeling import compute_dtype, device_kind

    cuda = device_kind() == "cuda"
    dtype = compute_dtype(cfg)
    optim = cfg.optim if cfg.optim != "auto" else ("paged_adamw_32bit" if cuda else "adamw_torch")
    has_eval = data.eval is not None
    kwargs = dict(
        output_dir=str(cfg.checkpoint_path),
        run_name=cfg.run_name or None,
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=optim,
        gradient_checkpointing=cfg.gradient_checkpointing != "false",  # `auto`: decided by the batch plan below
        bf16=cuda and dtype == torch.bfloat16,
        fp16=cuda and dtype == torch.float16,
        use_cpu=not cuda,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if (has_eval and cfg.eval_steps) else "no",
        eval_steps=cfg.eval_steps or None,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit or None,  # 0: keep every checkpoint
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=tracker.report_to,
        max_length=cfg.max_seq_length,
        packing=cfg.packing,
        padding_free=cfg.packing,
        dataset_num_proc=None,
        disable_tqdm=True,  # one log line per logging step reads better in CloudWatch / kubectl logs
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )
    # The fast path (entrypoints/perf.py, measured in entrypoints/PERF.md): packed micro-batches sized
    # from the GPU's memory, Liger kernels.
    plan = perf.plan_for(cfg, model, data.stats) if cfg.packing else None
    if plan is not None:
        log.info("batch plan: %s", plan)
    kwargs.update(perf.sft_overrides(cfg, plan, cuda))
    args = SFTConfig(**kwargs)
    extra_callbacks = []
    if plan is not None and plan.gradient_checkpointing and plan.layers_without_checkpointing:
        extra_callbacks.append(perf.partial_checkpointing_callback(plan.layers_without_checkpointing))
    peft_config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[trainer_callback(stop, cfg.checkpoint_uri, cfg.s3_endpoint_url,
                                    settings_fingerprint(cfg.to_public_dict())),
                   _throughput_callback(tracker), *extra_callbacks],
    )
    # TRL casts a quantized model's LoRA weights to bfloat16, but a resumed run reloads them through peft, which
    # upcasts adapters to float32: every resume switched the precision and ended with a different adapter than
    # an uninterrupted run. Float32 adapter weights (peft's own default) in both cases; under bf16/fp16 autocast
    # the matmuls still run in the compute dtype, so these are the usual float32 master weights.
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    if perf.wants_compile(cfg, cuda):
        perf.compile_layers(trainer.model)
    elif cfg.torch_compile and cuda:
        log.warning("torch_compile skipped: Triton needs a C compiler to build its launcher and none is installed")
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our Throughput callback logs each step once, via logging
    return trainer


def _throughput_callback(tracker: Any):
    from transformers import TrainerCallback

    class Throughput(TrainerCallback):
        """Adds trained-tokens-per-second (non-padding tokens, from TRL's `num_tokens`) to the logs."""

        def __init__(self) -> None:
            self.last: tuple[float, float] | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "num_tokens" not in logs:
                return
            now, tokens = time.monotonic(), float(logs["num_tokens"])
            if self.last is not None and now > self.last[0] and tokens > self.last[1]:
                rate = (tokens - self.last[1]) / (now - self.last[0])
                logs["tokens_per_second"] = round(rate, 1)
                tracker.log({"train/tokens_per_second": rate, "train/global_step": state.global_step})
            self.last = (now, tokens)
            if state.is_world_process_zero:
                shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in logs.items()}
                log.info("step %d/%d %s", state.global_step, state.max_steps, json.dumps(shown))

    return Throughput()


def generate_answers(model: Any, tokenizer: Any, template: str | None, samples: list[dict[str, Any]],
                     max_new_tokens: int) -> list[str]:
    import torch

    from entrypoints.templating import prompt_ids

    if not samples or template is None:
        return []
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    prompts = [prompt_ids(tokenizer, template, s["messages"]) for s in samples]
    # All prompts in one left-padded batch: each decoding step dequantizes the 4-bit weights once for
    # the whole batch instead of once per prompt (on CPU that is most of the cost).
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             use_cache=True, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    answers = [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    if was_training:
        model.train()
    return answers


def normalize_answer(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def answer_match(answers: Sequence[str], samples: Sequence[dict[str, Any]]) -> float | None:
    """Fraction of held-out answers that contain the reference answer (normalised case/punctuation)."""
    if not answers:
        return None
    hits = [normalize_answer(s["reference"]) in normalize_answer(a) for a, s in zip(answers, samples, strict=True)]
    return sum(hits) / len(hits)


def evaluate(trainer: Any, has_eval: bool) -> float | None:
    if not has_eval:
        return None
    loss = trainer.evaluate().get("eval_loss")
    return float(loss) if loss is not None and math.isfinite(loss) else None


def train(trainer: Any, cfg: JobConfig, stop: StopFlag, ranks: Ranks | None = None) -> dict[str, Any]:
    ranks = ranks or Ranks()
    ckpt_dir = cfg.checkpoint_path

    def tidy_checkpoints() -> Path | None:
        if cfg.checkpoint_uri:
            restore_from_uri(cfg.checkpoint_uri, ckpt_dir, cfg.s3_endpoint_url)
        found = latest_complete(ckpt_dir, settings_fingerprint(cfg.to_public_dict())) if cfg.resume else None
        remove_incomplete(ckpt_dir)
        return found

    # One process per host restores and prunes the (host-local) checkpoint directory; its ranks share the answer.
    resume = ranks.from_local_main(tidy_checkpoints, "checkpoint restore")
    if len(set(ranks.gather(resume.name if resume else None))) > 1:
        raise ConfigError([f"the hosts of this job would resume from different checkpoints in {ckpt_dir}: give every"
                           " host the same checkpoints (set QLORA_CHECKPOINT_URI, or a shared QLORA_CHECKPOINT_DIR)"])
    if resume:
        log.info("resuming from %s", resume)
    stop.training = True
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        stop.training = False
    if stop.is_set():
        raise Preempted(f"{stop.signal_name} received: checkpoint saved at step {trainer.state.global_step} in"
                        f" {ckpt_dir}; run the job again with the same settings to resume")
    return {"train_loss": float(result.training_loss), "global_step": int(result.global_step),
            "train_runtime_seconds": round(float(result.metrics.get("train_runtime", 0.0)), 1),
            "resumed_from": resume.name if resume else None}


def save_adapter(trainer: Any, tokenizer: Any, stage: Path) -> Path:
    adapter_dir = stage / "adapter"
    trainer.model.save_pretrained(adapter_dir, safe_serialization=True)
    tokenizer.save_pretrained(adapter_dir)
    return adapter_dir


# ------------------------------------------------------------------------------------------- job
def run(cfg: JobConfig, secrets: Mapping[str, str], env: Mapping[str, str], stop: StopFlag) -> dict[str, Any]:
    started = time.monotonic()
    work = cfg.paths.work_dir
    work.mkdir(parents=True, exist_ok=True)
    ranks = join_ranks(env)
    # World rank 0 claims the output (picking the versioned prefix) before any download or GPU work; every rank fails
    # alike on a conflict. The claim is given up however the run ends, preemption included.
    claim = OutputClaim(cfg.output_uri, cfg.output_exists, cfg.s3_endpoint_url, record=work / "output-claim.json")
    try:
        target = ranks.from_main(claim.acquire, "the output claim")
        log.info("output: %s%s", target.uri, " (versioned run)" if target.versioned else "")
        return _run_claimed(cfg, secrets, env, stop, ranks, target, claim, started)
    finally:
        claim.release()  # a no-op on the ranks that claimed nothing


def _run_claimed(cfg: JobConfig, secrets: Mapping[str, str], env: Mapping[str, str], stop: StopFlag, ranks: Ranks,
                 target: OutputTarget, claim: OutputClaim, started: float) -> dict[str, Any]:
    work = cfg.paths.work_dir
    inputs = ranks.from_local_main(lambda: resolve_inputs(cfg, work, secrets.get("HF_TOKEN")), "the input downloads")

    from entrypoints.modeling import device_kind, load_model, load_tokenizer
    from entrypoints.templating import choose_pad_token, resolve_chat_template

    tokenizer = load_tokenizer(inputs.model_dir, cfg)
    template = None if cfg.data_format == "text" else resolve_chat_template(tokenizer, cfg.chat_template)
    pad_token = choose_pad_token(tokenizer)
    tokenizer.pad_token = pad_token
    if template is not None:
        tokenizer.chat_template = template  # saved with the adapter, so inference formats prompts the same way
    data = ranks.local_main_first(
        lambda: prepare_data(cfg, inputs, tokenizer, template, fresh_cache=ranks.is_local_main), "data preparation")

    # One W&B run per job: transformers' WandbCallback logs from world rank 0 only, so only it opens the run.
    tracker = (WandbTracker(cfg.wandb_project, cfg.wandb_entity, cfg.run_name, cfg.to_public_dict(), work / "wandb")
               if ranks.is_main and wandb_wanted(cfg.report_to, {**env, **secrets}) else NullTracker())
    exit_code = 1
    try:
        model = load_model(inputs.model_dir, cfg, ranks.local_rank)
        trainer = build_trainer(cfg, model, tokenizer, data, tracker, stop, pad_token)
        is_main = trainer.is_world_process_zero()
        has_eval = data.eval is not None
        eval_before = evaluate(trainer, has_eval)
        before = generate_answers(trainer.model, tokenizer, template, data.samples, cfg.max_new_tokens) if is_main else []
        log.info("eval loss before training: %s", eval_before)
        result = train(trainer, cfg, stop, ranks)
        eval_after = evaluate(trainer, has_eval)
        after = generate_answers(trainer.model, tokenizer, template, data.samples, cfg.max_new_tokens) if is_main else []
        log.info("eval loss after training: %s", eval_after)
        if not is_main:
            exit_code = 0
            return {}
        samples = [{"prompt": s["prompt"], "reference": s["reference"], "before": b, "after": a}
                   for s, b, a in zip(data.samples, before, after, strict=True)]
        tokens_per_second = data.stats["train_tokens"] * max(cfg.num_epochs, 0) / max(result["train_runtime_seconds"], 1e-9)
        metrics = {
            "eval_loss_before": eval_before, "eval_loss_after": eval_after,
            "answer_match_before": answer_match(before, data.samples),
            "answer_match_after": answer_match(after, data.samples),
            **result, "device": device_kind(),
        }
        if cfg.max_steps < 0:
            metrics["approx_tokens_per_second"] = round(tokens_per_second, 1)
        tracker.log_samples("samples", samples)
        tracker.summary({k: v for k, v in metrics.items() if v is not None})

        stage = work / "output"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        publisher = Publisher(stage, target, cfg.s3_endpoint_url, claim)
        adapter_dir = save_adapter(trainer, tokenizer, stage)
        for path in storage.iter_tree(adapter_dir):
            publisher.submit(path)
        del trainer, model
        _free_memory()
        if cfg.merge:
            from entrypoints.merge import merge_adapter

            log.info("merging the adapter into the 16-bit base model")
            # Into the base as the adapter saw it in training (nf4/fp4 round trip): measured closest to
            # the trained model (entrypoints/MERGE.md); plain LoRA merges into the original weights.
            merge_into = {"nf4": "nf4", "fp4": "fp4", "none": "original"}[cfg.quantization]
            merge_summary = merge_adapter(inputs.model_dir, adapter_dir, stage / "merged", merge_into=merge_into,
                                          double_quant=cfg.double_quant, on_file_written=publisher.submit)
            metrics["merge"] = {k: v for k, v in merge_summary.items() if isinstance(v, (str, int, float, bool))}
        write_model_card(stage, cfg, {k: v for k, v in metrics.items() if not isinstance(v, dict)}, samples, cfg.merge)
        manifest = build_manifest(stage, cfg, {
            "base_model": {"source": cfg.model, "revision": cfg.model_revision},
            "data": {"source": cfg.data, "eval_source": cfg.eval_data or None,
                     "fingerprint_sha256": fingerprint_files(inputs.data_files), **data.stats},
            "metrics": metrics, "samples": samples,
        })
        manifest_uri = publisher.finish(manifest)
        summary = {"output": target.uri, "manifest": manifest_uri, **metrics, "samples": samples,
                   "wall_seconds": round(time.monotonic() - started, 1)}
        exit_code = 0
        return summary
    finally:
        tracker.finish(exit_code)


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def print_summary(summary: Mapping[str, Any], target: OutputTarget | None = None) -> None:
    lines = ["", "=== QLoRA job finished ===", f"output:    {summary.get('output')}",
             f"manifest:  {summary.get('manifest')}",
             f"eval loss: {summary.get('eval_loss_before')} -> {summary.get('eval_loss_after')}",
             f"held-out answer match: {summary.get('answer_match_before')} -> {summary.get('answer_match_after')}",
             f"steps: {summary.get('global_step')}  train loss: {summary.get('train_loss')}"
             f"  train time: {summary.get('train_runtime_seconds')} s  on {summary.get('device')}"]
    print("\n".join(lines), flush=True)
    print(SUMMARY_PREFIX + json.dumps(summary, default=str), flush=True)


def setup_logging(level: str = "info", rank: int | None = None) -> None:
    """`rank`: under torchrun every rank logs to the same stream, so each line says which rank wrote it."""
    tag = f"rank{rank} " if rank is not None else ""
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stdout,
                        format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s", force=True)
    for noisy in ("httpx", "urllib3", "botocore", "s3transfer", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    install_redactor()


def main(argv: Sequence[str] | None = None) -> int:
    env = dict(os.environ)
    argv = list(sys.argv[1:] if argv is None else argv)
    distributed = int(env.get("WORLD_SIZE", "1") or "1") > 1  # launched by torchrun with several processes
    setup_logging(env.get("QLORA_LOG_LEVEL", "info") if env.get("QLORA_LOG_LEVEL") in ("debug", "info", "warning", "error") else "info",
                  rank=int(env.get("RANK", "0")) if distributed else None)
    state: dict[str, Any] = {}
    stop = StopFlag()
    stop.install()

    def failure_file() -> Path:
        cfg = state.get("cfg")
        return cfg.paths.failure_file if cfg else container_paths(env.get("QLORA_BASE_DIR") or DEFAULT_BASE_DIR).failure_file

    def job() -> None:
        cfg = parse_config(env, argv)
        state["cfg"] = cfg
        logging.getLogger().setLevel(cfg.log_level.upper())
        secrets = resolve_secrets(cfg, env)
        for name, value in secrets.items():
            os.environ[name] = value  # for the libraries (huggingface_hub, wandb) that read them there
        log.info("settings: %s", json.dumps(cfg.to_public_dict()))
        summary = run(cfg, secrets, env, stop)
        if summary:
            print_summary(summary)

    code = run_guarded(job, failure_file, first_failure_wins=distributed)
    if distributed and code == 0:
        _leave_process_group()
    return code


def _leave_process_group() -> None:
    """Tear the process group down after a successful run (NCCL warns about leaked resources otherwise). Not
    after a failure: other ranks may still be inside a collective, and the teardown could then block this
    rank's exit, which is what tells torchrun to stop them."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - never turn a finished job into a crash here
        log.debug("destroy_process_group: %s", exc)


if __name__ == "__main__":
    sys.exit(main())
