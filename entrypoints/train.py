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
    clear_checkpoints,
    content_sha256,
    latest_complete,
    model_files,
    remove_incomplete,
    restore_from_uri,
    run_fingerprint,
    trainer_callback,
)
from entrypoints.config import JobConfig, env_name, parse_config
from entrypoints.data import LoadStats, list_data_files, load_conversations
from entrypoints.errors import (
    EXIT_INTERNAL,
    EXIT_PREEMPTED,
    ConfigError,
    DataError,
    JobError,
    ModelError,
    Preempted,
    StorageError,
    disk_space_for,
    run_guarded,
)
from entrypoints.outputs import (
    OutputClaim,
    OutputTarget,
    Publisher,
    build_manifest,
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
    eval_files: list[Path] = field(default_factory=list)
    content: dict[str, str | None] = field(default_factory=dict)  # sha256 of data, eval data and model files


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
    inputs = Inputs(data, eval_data, model_dir, list_data_files(data), list_data_files(eval_data) if eval_data else [])
    inputs.content = content_fingerprints(inputs, work)
    return inputs


def content_fingerprints(inputs: Inputs, work: Path) -> dict[str, str | None]:
    """sha256 of the bytes this run trains on: the training data, the eval data and the base model's files."""
    cache = work / "sha256-cache.json"
    return {
        "data_sha256": content_sha256(inputs.data_files, _root(inputs.data), cache),
        "eval_data_sha256": content_sha256(inputs.eval_files, _root(inputs.eval_data), cache) if inputs.eval_files else None,
        "model_sha256": content_sha256(model_files(inputs.model_dir), inputs.model_dir, cache),
    }


def _root(path: Path | None) -> Path | None:
    return None if path is None else (path.parent if path.is_file() else path)


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

    def tokenized(path: Path, stats: LoadStats, held_out: bool = False):
        def gen():
            for conv in load_conversations(path, cfg.data_format, cfg.max_bad_records, stats, held_out=held_out):
                yield {"record": json.dumps(conv)}
        try:
            return Dataset.from_generator(gen, cache_dir=str(cache_dir), keep_in_memory=False)
        except DatasetGenerationError as exc:
            # datasets wraps whatever the generator raised; a bad record is a data error, not a crash.
            if isinstance(exc.__cause__, JobError):
                raise exc.__cause__ from None
            raise

    seq = cfg.max_seq_length

    def tokenize(batch):
        # Truncated here, to max_seq_length (keeping the start), so that what is counted below is what is trained
        # on; the full lengths and answer-token counts are kept to report what truncation removed.
        out: dict[str, list] = {"input_ids": [], "assistant_masks": [], "full_tokens": [], "full_loss_tokens": []}
        for raw in batch["record"]:
            conv = json.loads(raw)
            if isinstance(conv, str):
                enc = tokenize_text(tokenizer, conv)
            else:
                if template is None:
                    raise DataError("chat records need a chat template, but none could be resolved")
                enc = tokenize_conversation(tokenizer, template, conv, cfg.assistant_only_loss)
            out["full_tokens"].append(len(enc["input_ids"]))
            out["full_loss_tokens"].append(sum(enc["assistant_masks"]))
            out["input_ids"].append(enc["input_ids"][:seq])
            out["assistant_masks"].append(enc["assistant_masks"][:seq])
        return out

    train_stats = LoadStats()
    train_raw = tokenized(inputs.data, train_stats)
    stats: dict[str, Any] = {"format": train_stats.fmt, "train_records_read": train_stats.records,
                             "bad_records_skipped": train_stats.skipped}
    if inputs.eval_data is not None:
        eval_stats = LoadStats()
        eval_raw = tokenized(inputs.eval_data, eval_stats, held_out=True)
        stats["bad_records_skipped"] += eval_stats.skipped
    elif cfg.eval_fraction > 0 and len(train_raw) < 2:
        log.warning("%s=%s: a single training record cannot be split; no eval split is held out",
                    env_name("eval_fraction"), cfg.eval_fraction)
        eval_raw = None
    elif cfg.eval_fraction > 0:
        n_eval = max(1, round(len(train_raw) * cfg.eval_fraction))
        if len(train_raw) - n_eval < 1:
            raise ConfigError([f"{env_name('eval_fraction')}={cfg.eval_fraction} holds out {n_eval} of the"
                               f" {len(train_raw)} training record(s), leaving none to train on: lower it, set it to"
                               f" 0 (no eval), or give held-out data in {env_name('eval_data')}"])
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
    train_counts = _token_stats(train_ds, "train")
    eval_counts = _token_stats(eval_ds, "eval") if eval_ds is not None else {}
    stats.update({"train_records": len(train_ds), "eval_records": len(eval_ds) if eval_ds is not None else 0,
                  **train_counts, **{k: v for k, v in eval_counts.items() if k.startswith("eval_")},
                  "longest_record_tokens": max(train_counts["longest_record_tokens"],
                                               eval_counts.get("longest_record_tokens", 0))})
    train_ds = train_ds.remove_columns(["full_tokens", "full_loss_tokens"])
    eval_ds = eval_ds.remove_columns(["full_tokens", "full_loss_tokens"]) if eval_ds is not None else None
    check_loss_tokens(stats, seq, cfg.assistant_only_loss)
    if eval_ds is not None and stats["eval_loss_tokens"] == 0:
        log.warning("no eval record has an answer token within max_seq_length=%d: the eval loss is skipped", seq)
        eval_ds = None
    if fresh_cache or train_stats.records:
        log.info("data: %s", json.dumps(stats))
    else:  # the generator did not run: every split came from the caches local rank 0 built
        log.info("data: reused the Arrow caches in %s (%d train, %d eval records)", cache_dir,
                 stats["train_records"], stats["eval_records"])
    return Prepared(train_ds, eval_ds, samples, stats)


def _token_stats(ds: Any, split: str) -> dict[str, int]:
    """Token counts by batched iteration over the Arrow table (reading whole columns would load them into RAM):
    tokens and answer (loss) tokens as trained on, after truncation, and before it."""
    import numpy as np
    import pyarrow.compute as pc

    lengths = []  # one int32 per record: 4 MB per million records
    tokens = loss_tokens = full_loss_tokens = truncated = no_answer = longest = 0
    columns = ["input_ids", "assistant_masks", "full_tokens", "full_loss_tokens"]
    # Batches of 1,000 records: the per-record sums below make numpy copies of a batch's masks (8 bytes a token).
    for batch in ds.select_columns(columns).with_format("arrow").iter(batch_size=1_000):
        kept = pc.list_value_length(batch["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
        full = batch["full_tokens"].to_numpy(zero_copy_only=False).astype(np.int64)
        # Answer tokens per record: differences of the running sum of the flattened 0/1 masks at list boundaries.
        masks = batch["assistant_masks"]
        running = np.concatenate([[0], np.cumsum(pc.list_flatten(masks).to_numpy(zero_copy_only=False))])
        ends = np.cumsum(pc.list_value_length(masks).to_numpy(zero_copy_only=False).astype(np.int64))
        per_record_loss = running[ends] - running[np.concatenate([[0], ends[:-1]])]
        lengths.append(full.astype(np.int32))
        tokens += int(kept.sum())
        loss_tokens += int(per_record_loss.sum())
        full_loss_tokens += int(pc.sum(batch["full_loss_tokens"]).as_py() or 0)
        truncated += int((full > kept).sum())
        no_answer += int((per_record_loss == 0).sum())
        longest = max(longest, int(kept.max()) if len(kept) else 0)
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int32)
    return {f"{split}_tokens": tokens, f"{split}_loss_tokens": loss_tokens,
            f"{split}_loss_tokens_before_truncation": full_loss_tokens,
            f"{split}_records_truncated": truncated, f"{split}_records_without_answer_tokens": no_answer,
            "median_tokens_per_record": int(np.sort(all_lengths)[len(all_lengths) // 2]) if len(all_lengths) else 0,
            "longest_record_tokens": longest}


def check_loss_tokens(stats: dict[str, Any], max_seq_length: int, assistant_only_loss: bool) -> None:
    """Fail when truncation (or the masks) leave nothing to train on; warn when truncation removes most of it."""
    before, after = stats["train_loss_tokens_before_truncation"], stats["train_loss_tokens"]
    what = "answer tokens" if assistant_only_loss else "tokens"
    if before == 0:
        raise DataError("no token is trained on: every record's answer was masked out (check the data format)")
    if after == 0:
        raise DataError(f"{env_name('max_seq_length')}={max_seq_length} truncates away every one of the {before:,}"
                        f" {what} of the {stats['train_records']:,} training record(s) (median record"
                        f" {stats['median_tokens_per_record']:,} tokens): nothing would be trained on. Raise"
                        f" {env_name('max_seq_length')} or shorten the prompts")
    removed = before - after
    if removed:
        share = removed / before
        log.log(logging.WARNING if share > 0.5 else logging.INFO,
                "truncation at max_seq_length=%d removes %d of %d %s (%.0f%%) in %d of %d training records; %d"
                " records keep no answer token%s", max_seq_length, removed, before, what, 100 * share,
                stats["train_records_truncated"], stats["train_records"], stats["train_records_without_answer_tokens"],
                ": raise QLORA_MAX_SEQ_LENGTH or shorten the prompts" if share > 0.5 else "")


def build_trainer(cfg: JobConfig, model: Any, tokenizer: Any, data: Prepared, tracker: Any, stop: StopFlag,
                  plan: perf.BatchPlan | None, fingerprint: dict):
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
    # The fast path (entrypoints/perf.py, measured in docs/PERF.md): packed micro-batches sized
    # from the GPU's memory, Liger kernels.
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
        callbacks=[trainer_callback(stop, cfg.checkpoint_uri, cfg.s3_endpoint_url, fingerprint),
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
                shown = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in logs.items()}  # 4 significant digits: a learning rate of 2e-05 is not 0.0
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


def planned_steps(trainer: Any, cfg: JobConfig) -> int:
    """The optimizer steps this run ends at, counted as the Trainer counts them (its dataloader, accumulation)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    batches = len(trainer.get_train_dataloader())
    accum = trainer.args.gradient_accumulation_steps
    per_epoch = max(batches // accum + int(batches % accum > 0), 1)
    return math.ceil(cfg.num_epochs * per_epoch)


def find_checkpoint(cfg: JobConfig, fingerprint: dict, ranks: Ranks) -> Path | None:
    """The newest complete checkpoint of this very run (same inputs, settings and batch layout), restored from
    QLORA_CHECKPOINT_URI when the local directory has none; None to start at step 0."""
    ckpt_dir = cfg.checkpoint_path

    def tidy_checkpoints() -> Path | None:
        if not cfg.resume:
            clear_checkpoints(ckpt_dir)
            return None
        if cfg.checkpoint_uri:
            restore_from_uri(cfg.checkpoint_uri, ckpt_dir, cfg.s3_endpoint_url, fingerprint)
        found = latest_complete(ckpt_dir, fingerprint)
        remove_incomplete(ckpt_dir)
        return found

    # One process per host restores and prunes the (host-local) checkpoint directory; its ranks share the answer.
    resume = ranks.from_local_main(tidy_checkpoints, "checkpoint restore")
    if len(set(ranks.gather(resume.name if resume else None))) > 1:
        raise ConfigError([f"the hosts of this job would resume from different checkpoints in {ckpt_dir}: give every"
                           " host the same checkpoints (set QLORA_CHECKPOINT_URI, or a shared QLORA_CHECKPOINT_DIR)"])
    return resume


def train(trainer: Any, cfg: JobConfig, stop: StopFlag, resume: Path | None) -> dict[str, Any]:
    ckpt_dir = cfg.checkpoint_path
    total = planned_steps(trainer, cfg)
    # Warm-up in whole steps, rounded down: the Trainer rounds a ratio up, and its first warm-up step runs at
    # learning rate 0, so a short run (under 1/warmup_ratio steps) spent a step, or its only step, learning nothing.
    trainer.args.warmup_steps = math.floor(cfg.warmup_ratio * total)
    resumed_at = checkpoint_step(resume) if resume else 0
    if resumed_at > total:
        raise ConfigError([f"{resume} is at step {resumed_at}, past this run's last step {total} (max_steps or"
                           " num_epochs were lowered since it was written): raise QLORA_MAX_STEPS/QLORA_NUM_EPOCHS"
                           " to at least that step, or set QLORA_RESUME=false to start over"])
    if resume and resumed_at == total:
        # The checkpoint is the finished run (a rerun after a stop during eval, merge or upload): take its adapter
        # as it is. The Trainer would run one more step before noticing there is nothing left to do.
        log.info("resuming from %s: it is this run's last step (%d), nothing is left to train", resume, total)
        load_adapter_weights(trainer.model, resume)
        trainer.state.global_step = resumed_at
        return {"train_loss": None, "global_step": resumed_at, "steps_this_run": 0, "train_runtime_seconds": 0.0,
                "resumed_from": resume.name}
    if resume:
        log.info("resuming from %s (step %d of %d)", resume, resumed_at, total)
    stop.training = True
    try:
        with disk_space_for(ckpt_dir, "saving a checkpoint"):
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        stop.training = False
    if stop.is_set():
        raise Preempted(f"{stop.signal_name} received: checkpoint saved at step {trainer.state.global_step} in"
                        f" {ckpt_dir}; run the job again with the same settings to resume")
    if int(result.global_step) != total:
        raise JobError(f"training ended at step {result.global_step}, not at the planned step {total}: the adapter"
                       " is not published. This is a bug; the checkpoints are kept")
    return {"train_loss": float(result.training_loss), "global_step": int(result.global_step),
            "steps_this_run": int(result.global_step) - resumed_at,
            "train_runtime_seconds": round(float(result.metrics.get("train_runtime", 0.0)), 1),
            "resumed_from": resume.name if resume else None}


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[-1])


def load_adapter_weights(model: Any, checkpoint: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ModelError(f"{checkpoint}: the checkpoint's adapter lacks {len(missing)} LoRA tensor(s) of this run's"
                         f" model (e.g. {missing[0]}): set QLORA_RESUME=false to start over")


def check_trained(model: Any, result: dict[str, Any], cfg: JobConfig) -> None:
    """A run that learned nothing, or diverged, must not be published as a result.

    LoRA starts with every B matrix at zero (the adapter is the identity), so an adapter whose B matrices are all
    still zero after training was never updated: every step ran at learning rate 0, or no token carried a loss.
    """
    import torch

    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss = result.get("train_loss")
    if (loss is not None and not math.isfinite(loss)) or any(not torch.isfinite(p).all() for p in trainable):
        raise ConfigError([f"training diverged: the loss is {loss} and the adapter holds non-finite values after"
                           f" step {result['global_step']}. Lower {env_name('learning_rate')} (now"
                           f" {cfg.learning_rate}), keep {env_name('max_grad_norm')} above 0, or use"
                           f" {env_name('compute_dtype')}=bfloat16 instead of float16"])
    if lora_b and all(not p.any() for p in lora_b):
        raise ConfigError([f"training changed nothing: after {result['global_step']} optimizer step(s) the adapter is"
                           f" still the identity (every LoRA B matrix is zero), so publishing it would publish the"
                           f" base model. This happens when every step runs at learning rate 0 (too few steps for"
                           f" {env_name('warmup_ratio')}={cfg.warmup_ratio}), or no token carries a loss. Check"
                           f" {env_name('learning_rate')}, {env_name('warmup_ratio')}, {env_name('max_steps')} and"
                           " the data"])


def save_adapter(trainer: Any, tokenizer: Any, stage: Path) -> Path:
    adapter_dir = stage / "adapter"
    trainer.model.save_pretrained(adapter_dir, safe_serialization=True)
    tokenizer.save_pretrained(adapter_dir)
    return adapter_dir


# ------------------------------------------------------------------------------------------- job
_HELD_LOCKS: list[Any] = []  # open lock files: each lock lives as long as its file stays open


def lock_local_dirs(cfg: JobConfig) -> None:
    """Hold an exclusive lock on the work and checkpoint directories for the life of the process: a second job
    started on the same directories (a rerun while the first still runs, two schedules on one base dir) would
    otherwise overwrite the first one's downloads, data caches and checkpoints. The kernel releases the locks when
    the process ends, however it ends, so a killed job never leaves a stale lock."""
    import fcntl
    import socket

    for folder, setting in ((cfg.paths.work_dir, "base_dir"), (cfg.checkpoint_path, "checkpoint_dir")):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle = open(folder / ".qlora-job.lock", "a+")  # noqa: SIM115 - kept open: the lock lives with it
        except OSError as exc:
            raise StorageError(f"cannot create or write {folder} ({exc.strerror or exc}): the job needs a writable"
                               f" {env_name(setting)}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError([f"{folder} is in use by another job ({holder}): two jobs in one directory would"
                               " overwrite each other's downloads, caches and checkpoints. Wait for it to end, or give"
                               f" this job its own {env_name(setting)}"]) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
        handle.flush()
        _HELD_LOCKS.append(handle)


def release_local_dirs() -> None:
    while _HELD_LOCKS:
        _HELD_LOCKS.pop().close()


def route_library_logs() -> None:
    """transformers logs through a handler of its own on stderr; route it through the job's handler instead, so its
    warnings (a load report, a deprecation) carry the job's time stamps and rank tags and land in the same stream."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def job_identity(cfg: JobConfig, env: Mapping[str, str]) -> str:
    """What stays the same across the attempts of one job and differs between jobs: SageMaker's job name (a spot
    restart keeps it), else the checkpoint prefix (the launcher gives every Kubernetes Job its own; attempts share
    it, and two jobs sharing it would mix their checkpoints anyway). Empty: only the work directory tells."""
    if env.get("TRAINING_JOB_NAME"):
        return "sagemaker-job:" + env["TRAINING_JOB_NAME"]
    return "checkpoints:" + cfg.checkpoint_uri if cfg.checkpoint_uri else ""


def run(cfg: JobConfig, secrets: Mapping[str, str], env: Mapping[str, str], stop: StopFlag) -> dict[str, Any]:
    started = time.monotonic()
    route_library_logs()
    work = cfg.paths.work_dir
    ranks = join_ranks(env)
    # A host's ranks share its directories; its local rank 0 holds them for the job.
    ranks.from_local_main(lambda: lock_local_dirs(cfg), "the directory locks")
    # World rank 0 claims the output (picking the versioned prefix) before any download or GPU work; every rank fails
    # alike on a conflict. The claim is given up however the run ends, preemption included.
    claim = OutputClaim(cfg.output_uri, cfg.output_exists, cfg.s3_endpoint_url, record=work / "output-claim.json",
                        owner=job_identity(cfg, env))
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

    from entrypoints.modeling import cap_gpu_memory, device_kind, load_model, load_model_config, load_tokenizer
    from entrypoints.templating import choose_pad_token, resolve_chat_template

    tokenizer = load_tokenizer(inputs.model_dir, cfg)
    template = None if cfg.data_format == "text" else resolve_chat_template(tokenizer, cfg.chat_template)
    tokenizer.pad_token = choose_pad_token(tokenizer)
    if template is not None:
        tokenizer.chat_template = template  # saved with the adapter, so inference formats prompts the same way
    with disk_space_for(work / "datasets-cache", "tokenizing the data"):
        data = ranks.local_main_first(
            lambda: prepare_data(cfg, inputs, tokenizer, template, fresh_cache=ranks.is_local_main), "data preparation")

    # The fast path (entrypoints/perf.py, measured in docs/PERF.md): packed micro-batches sized from the
    # GPU's memory (capped first, when max_gpu_memory_gib is set). Planned from the model's config, before loading
    # it, so that a checkpoint of other inputs or settings is refused before minutes of loading.
    if device_kind() == "cuda":
        cap_gpu_memory(cfg.max_gpu_memory_gib, ranks.local_rank)
    plan = perf.plan_for(cfg, load_model_config(inputs.model_dir, cfg), data.stats) if cfg.packing else None
    if plan is not None:
        log.info("batch plan: %s", plan)
    batch = ({"rows": plan.rows, "row_tokens": plan.row_tokens, "accumulation": plan.gradient_accumulation_steps}
             if plan else {"rows": cfg.micro_batch_size, "accumulation": cfg.gradient_accumulation_steps})
    fingerprint = run_fingerprint(cfg.to_public_dict(), inputs.content, {**batch, "processes": ranks.world_size})
    resume = find_checkpoint(cfg, fingerprint, ranks)

    # One W&B run per job: transformers' WandbCallback logs from world rank 0 only, so only it opens the run.
    tracker = (WandbTracker(cfg.wandb_project, cfg.wandb_entity, cfg.run_name, cfg.to_public_dict(), work / "wandb")
               if ranks.is_main and wandb_wanted(cfg.report_to, {**env, **secrets}) else NullTracker())
    exit_code = 1
    try:
        model = load_model(inputs.model_dir, cfg, ranks.local_rank)
        trainer = build_trainer(cfg, model, tokenizer, data, tracker, stop, plan, fingerprint)
        is_main = trainer.is_world_process_zero()
        has_eval = data.eval is not None
        eval_before = evaluate(trainer, has_eval)
        before = generate_answers(trainer.model, tokenizer, template, data.samples, cfg.max_new_tokens) if is_main else []
        log.info("eval loss before training: %s", eval_before)
        result = train(trainer, cfg, stop, resume)
        check_trained(trainer.model, result, cfg)
        eval_after = evaluate(trainer, has_eval)
        after = generate_answers(trainer.model, tokenizer, template, data.samples, cfg.max_new_tokens) if is_main else []
        log.info("eval loss after training: %s", eval_after)
        if not is_main:
            exit_code = 0
            return {}
        samples = [{"prompt": s["prompt"], "reference": s["reference"], "before": b, "after": a}
                   for s, b, a in zip(data.samples, before, after, strict=True)]
        metrics = {
            "eval_loss_before": eval_before, "eval_loss_after": eval_after,
            "answer_match_before": answer_match(before, data.samples),
            "answer_match_after": answer_match(after, data.samples),
            **result, "device": device_kind(),
        }
        if cfg.max_steps < 0 and result["steps_this_run"] and result["train_runtime_seconds"] > 0:
            share = result["steps_this_run"] / max(result["global_step"], 1)  # of the epochs' tokens, this run's
            tokens = data.stats["train_tokens"] * cfg.num_epochs * share
            metrics["approx_tokens_per_second"] = round(tokens / result["train_runtime_seconds"], 1)
        tracker.log_samples("samples", samples)
        tracker.summary({k: v for k, v in metrics.items() if v is not None})

        stage = work / "output"
        with disk_space_for(stage, "writing the outputs"):
            shutil.rmtree(stage, ignore_errors=True)
            stage.mkdir(parents=True)
            publisher = Publisher(stage, target, cfg.s3_endpoint_url, claim)
            adapter_dir = save_adapter(trainer, tokenizer, stage)
            for path in storage.iter_tree(adapter_dir):
                publisher.submit(path)
            del trainer, model  # the merge needs the memory the 4-bit model holds
            _free_memory()
            manifest_uri = publish(cfg, inputs, data, stage, publisher, adapter_dir, metrics, samples)
        summary = {"output": target.uri, "manifest": manifest_uri, **metrics, "samples": samples,
                   "wall_seconds": round(time.monotonic() - started, 1)}
        exit_code = 0
        return summary
    finally:
        tracker.finish(exit_code)


def publish(cfg: JobConfig, inputs: Inputs, data: Prepared, stage: Path, publisher: Publisher, adapter_dir: Path,
            metrics: dict[str, Any], samples: list[dict[str, Any]]) -> str:
    """Merge, write the model card and the manifest, and publish what is left (the manifest last)."""
    if cfg.merge:
        from entrypoints.merge import merge_adapter

        log.info("merging the adapter into the 16-bit base model")
        # Into the base as the adapter saw it in training (nf4/fp4 round trip): measured closest to
        # the trained model (docs/MERGE.md); plain LoRA merges into the original weights.
        merge_into = {"nf4": "nf4", "fp4": "fp4", "none": "original"}[cfg.quantization]
        merge_summary = merge_adapter(inputs.model_dir, adapter_dir, stage / "merged", merge_into=merge_into,
                                      double_quant=cfg.double_quant, on_file_written=publisher.submit)
        metrics["merge"] = {k: v for k, v in merge_summary.items() if isinstance(v, (str, int, float, bool))}
    write_model_card(stage, cfg, {k: v for k, v in metrics.items() if not isinstance(v, dict)}, samples, cfg.merge)
    manifest = build_manifest(stage, cfg, {
        "base_model": {"source": cfg.model, "revision": cfg.model_revision,
                       "fingerprint_sha256": inputs.content["model_sha256"]},
        "data": {"source": cfg.data, "eval_source": cfg.eval_data or None,
                 "fingerprint_sha256": inputs.content["data_sha256"],
                 "eval_fingerprint_sha256": inputs.content["eval_data_sha256"], **data.stats},
        "metrics": metrics, "samples": samples,
    })
    return publisher.finish(manifest)


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
             f"steps: {summary.get('global_step')}  train loss: "
             f"{'n/a (resumed at the final step)' if summary.get('train_loss') is None else summary.get('train_loss')}"
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
        try:
            summary = run(cfg, secrets, env, stop)
        except (Preempted, RankFailed):
            raise
        except BaseException as exc:
            if stop.is_set():
                # What the signal interrupted (a worker pool, a download, a library call) may surface as an error of
                # its own: the cause is the signal, and the documented answer to it is exit 75 and a rerun.
                raise Preempted(f"{stop.signal_name} received before a checkpoint could be saved ({type(exc).__name__}"
                                " while stopping); run the job again with the same settings to resume") from None
            raise
        finally:
            release_local_dirs()
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
