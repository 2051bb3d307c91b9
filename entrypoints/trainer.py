"""The trainer: TRL's SFTTrainer configured for the job (one SFTConfig, built in one place), the resume decision,
the training run itself and the checks that it trained something. An encoder-decoder (seq2seq) model, which TRL's
SFTTrainer does not train, gets transformers' Seq2SeqTrainer with the same arguments less TRL's data ones.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from entrypoints import compile_cache, perf
from entrypoints.checkpoints import (
    StopFlag,
    checkpoint_total_steps,
    clear_checkpoints,
    latest_complete,
    localize_best,
    remove_incomplete,
    restore_from_uri,
    trainer_callback,
)
from entrypoints.config import JobConfig, env_name
from entrypoints.dataset import TokenizedData
from entrypoints.errors import ConfigError, JobError, ModelError, Preempted, disk_space_for
from entrypoints.ranks import Ranks
from entrypoints.sizing import BatchPlan, Parallelism

log = logging.getLogger("qlora")


def compiles(cfg: JobConfig, plan: BatchPlan | None, cuda: bool, fsdp: bool = False) -> bool:
    """Whether the decoder layers are compiled (perf.wants_compile, with the plan's checkpointing). Under FSDP only
    when asked for (`true`): compiled layers inside FSDP2 units have not been measured; `auto` uses Liger there."""
    if fsdp and cfg.torch_compile == "auto":
        return False
    partial = plan is not None and plan.gradient_checkpointing and plan.layers_without_checkpointing > 0
    return perf.wants_compile(cfg.torch_compile, cuda, partial)


def sft_config(cfg: JobConfig, plan: BatchPlan | None, cuda: bool, precision: str, has_eval: bool,
               report_to: str | list[str]) -> dict[str, Any]:
    """Every SFTConfig argument of the job, decided here once. `plan`: packed micro-batches sized from the GPU's
    memory (sizing.plan_batch; None without packing: padded micro-batches of micro_batch_size samples);
    `precision`: the compute dtype's name."""
    use_compile = compiles(cfg, plan, cuda)
    best = keeps_best(cfg, has_eval)
    return dict(
        output_dir=str(cfg.checkpoint_path),
        run_name=cfg.run_name or None,
        # Packed: rows of plan.row_tokens (samples were cut at max_seq_length already, and a row holds the longest
        # whole), concatenated into one sequence per micro-batch with per-sample positions (padding-free).
        packing=plan is not None,
        packing_strategy="bfd",  # best-fit decreasing: whole samples per row
        padding_free=plan is not None,
        max_length=plan.row_tokens if plan else cfg.max_seq_length,
        per_device_train_batch_size=plan.rows if plan else cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps if plan else cfg.gradient_accumulation_steps,
        # `auto`: the plan's decision (the first layers the memory allows keep their activations, the callback of
        # build_trainer exempts them); without a plan every layer is recomputed unless it is switched off.
        gradient_checkpointing=plan.gradient_checkpointing if plan else cfg.gradient_checkpointing != "false",
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=0,  # set by train() in whole steps, once the number of steps is known
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=optimizer(cfg.optim, plan, cuda),
        # The plan's choice when memory is short: the recomputed layers' inputs wait in CPU memory (TRL's offloading
        # context around every training step); CUDA only (TRL's offloading copies to and from an accelerator).
        activation_offloading=bool(plan is not None and plan.activation_offload and cuda),
        # Liger's RMSNorm, SwiGLU and RoPE kernels are Triton kernels, which torch.compile cannot trace (it fuses
        # the same operations itself); TRL keeps its own fused LM head + cross-entropy.
        use_liger_kernel=cfg.use_liger and cuda and not use_compile and perf.liger_available(),
        bf16=cuda and precision == "bfloat16",
        fp16=cuda and precision == "float16",
        use_cpu=not cuda,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if (has_eval and cfg.eval_steps) else "no",
        eval_steps=cfg.eval_steps or None,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        # With periodic evaluation the adapter of the evaluation with the lowest eval loss is the result: the Trainer
        # keeps its checkpoint through rotation and loads it when training ends (config checks that save_steps is a
        # multiple of eval_steps, so that every evaluated step has a checkpoint).
        load_best_model_at_end=best,
        metric_for_best_model="eval_loss" if best else None,
        greater_is_better=False if best else None,
        # Early stopping's count of evaluations without improvement lives in trainer_state.json; without this a
        # resumed run would start counting again.
        restore_callback_states_from_checkpoint=True,
        save_total_limit=cfg.save_total_limit or None,  # 0: keep every checkpoint
        # Local rank 0 of every host writes (and rotates) the checkpoint in its host's own checkpoint directory: each
        # rank loads the adapter, optimizer and scheduler from its host's disk on resume, which world rank 0 alone
        # would leave without them. On one host the same as saving from rank 0.
        save_on_each_node=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=report_to,
        dataset_num_proc=None,
        disable_tqdm=True,  # one log line per logging step reads better in CloudWatch / kubectl logs
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )


def optimizer(optim: str, plan: BatchPlan | None, cuda: bool) -> str:
    """The optimizer's name for the trainer: the setting, or for `auto` the plan's pick when memory is short
    (bitsandbytes' 8-bit AdamW), else fused AdamW on CUDA. LoRA's optimizer state is small (~0.6 GB for 7B r=16):
    paging it buys nothing, and the fused AdamW kernel was 8.7% faster end to end on the 7B shape (docs/PERF.md)."""
    if optim != "auto":
        return optim
    if plan is not None and plan.optim:
        return plan.optim
    return "adamw_torch_fused" if cuda else "adamw_torch"


# SFTConfig's arguments about TRL's own data handling (packing, padding-free batches, its truncation) and its
# activation offloading: not arguments of transformers' Seq2SeqTrainingArguments, whose data is tokenized and
# truncated by the job (and which a seq2seq run, never planned, does not need).
SFT_DATA_ARGUMENTS = ("packing", "packing_strategy", "padding_free", "max_length", "dataset_num_proc",
                      "activation_offloading")


def seq2seq_config(sft_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The job's trainer arguments (sft_config) as Seq2SeqTrainingArguments: without TRL's data arguments, and
    counting the encoder's non-padding input tokens (the throughput log's tokens; TRL counts its own)."""
    kwargs = {k: v for k, v in sft_kwargs.items() if k not in SFT_DATA_ARGUMENTS}
    kwargs["include_num_input_tokens_seen"] = "non_padding"
    return kwargs


def _checkpointing_name(kwargs: dict[str, Any], args_class: Any) -> dict[str, Any]:
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(args_class)}:
        # transformers >= 5.2x renamed the setting (the old name still works, with a FutureWarning); 5.17 has only
        # the old one: the name this transformers knows.
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
    return kwargs


def _sft_trainer(model: Any, kwargs: dict[str, Any], data: TokenizedData, tokenizer: Any, peft_config: Any,
                 callbacks: list[Any]) -> Any:
    from trl import SFTConfig, SFTTrainer

    return SFTTrainer(model=model, args=SFTConfig(**_checkpointing_name(kwargs, SFTConfig)),
                      train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
                      peft_config=peft_config, callbacks=callbacks)


def _seq2seq_trainer(model: Any, kwargs: dict[str, Any], data: TokenizedData, tokenizer: Any, peft_config: Any,
                     callbacks: list[Any]) -> Any:
    """transformers' Seq2SeqTrainer on (input_ids, labels) pairs, padded per micro-batch (labels with -100, which
    carries no loss); the LoRA model is made here, as SFTTrainer makes it from peft_config."""
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    args = Seq2SeqTrainingArguments(**_checkpointing_name(seq2seq_config(kwargs), Seq2SeqTrainingArguments))
    model = get_peft_model(model, peft_config)
    if kwargs["gradient_checkpointing"]:
        # Checkpointed blocks of a frozen model recompute nothing with a gradient unless their input asks for one.
        model.enable_input_require_grads()
    return Seq2SeqTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                          data_collator=DataCollatorForSeq2Seq(tokenizer, model=model), processing_class=tokenizer,
                          callbacks=callbacks)


def keeps_best(cfg: JobConfig, has_eval: bool) -> bool:
    """Whether the run publishes its best evaluated adapter (periodic evaluation) rather than its last one."""
    return has_eval and cfg.eval_steps > 0


def build_trainer(cfg: JobConfig, model: Any, tokenizer: Any, data: TokenizedData, tracker: Any, stop: StopFlag,
                  plan: BatchPlan | None, fingerprint: dict, seq2seq: bool = False, parallel: Parallelism | None = None,
                  resume: Path | None = None):
    """`parallel`: how the processes share the work (perf.parallelism_for); None or not `fsdp`: DDP (or one
    process), which the Trainer sets up by itself under torchrun. `resume`: the checkpoint the run resumes from
    (find_checkpoint), whose compile cache is loaded before the first forward pass when the layers are compiled."""
    import torch
    from peft import LoraConfig

    from entrypoints.modeling import compute_dtype, device_kind

    check_lora_targets(model, cfg.target_modules)
    cuda = device_kind() == "cuda"
    precision = str(compute_dtype(cfg, seq2seq)).removeprefix("torch.")
    kwargs = sft_config(cfg, plan, cuda, precision, data.eval is not None, tracker.report_to)
    fsdp = parallel is not None and parallel.mode == "fsdp"
    if fsdp:
        kwargs.update(perf.fsdp_arguments(list(getattr(model, "_no_split_modules", None) or [])))
        kwargs["use_liger_kernel"] = (cfg.use_liger and cuda and not compiles(cfg, plan, cuda, fsdp)
                                      and perf.liger_available())
    extra_callbacks = []
    if cfg.eval_steps and data.eval is None:
        log.warning("%s=%d: there is no eval data to evaluate, so the last step's adapter is published%s",
                    env_name("eval_steps"), cfg.eval_steps, " and early stopping is off" if cfg.early_stopping_patience
                    else "")
    elif keeps_best(cfg, True) and cfg.early_stopping_patience:
        extra_callbacks.append(early_stopping_callback(cfg.early_stopping_patience, cfg.early_stopping_threshold))
    if plan is not None and plan.gradient_checkpointing and plan.layers_without_checkpointing:
        extra_callbacks.append(perf.partial_checkpointing_callback(plan.layers_without_checkpointing))
    use_compile = compiles(cfg, plan, cuda, fsdp)
    checkpointing = bool(kwargs["gradient_checkpointing"])
    kept = plan.layers_without_checkpointing if plan is not None else 0
    layers = sum(1 for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
    recomputed = [index for index in range(layers) if checkpointing and index >= kept]
    cache = (compile_cache.CompileCache(cfg.compile_cache, compile_cache.key_parts(
        model.config, precision, recomputed, {
            "lora": f"r={cfg.lora_r} alpha={cfg.lora_alpha} dropout={cfg.lora_dropout} targets={cfg.lora_target_modules}",
            "attention": getattr(model.config, "_attn_implementation", None),
            "activation_offload": kwargs["activation_offloading"], "fsdp": fsdp}), cfg.s3_endpoint_url)
        if use_compile and cfg.compile_cache != "off" else None)
    if cache is not None:
        extra_callbacks.append(cache.callback())
    peft_config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        bias="none",
        task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM",
    )
    callbacks = [trainer_callback(stop, cfg.checkpoint_uri, cfg.s3_endpoint_url, fingerprint,
                                  before_complete=cache.save_to_checkpoint if cache is not None else None),
                 _throughput_callback(tracker), *extra_callbacks]
    trainer = (_seq2seq_trainer if seq2seq else _sft_trainer)(model, kwargs, data, tokenizer, peft_config, callbacks)
    if fsdp and not trainer.is_fsdp_enabled:
        # accelerate turns FSDP on for GPU process groups only; on CPU ranks it would quietly train DDP instead.
        raise ConfigError([f"{env_name('parallelism')}=fsdp: FSDP runs on CUDA GPUs only (accelerate does not shard"
                           f" across CPU processes); use {env_name('parallelism')}=ddp (or auto) here"])
    # TRL casts a quantized model's LoRA weights to bfloat16, but a resumed run reloads them through peft, which
    # upcasts adapters to float32: every resume switched the precision and ended with a different adapter than
    # an uninterrupted run. Float32 adapter weights (peft's own default) in both cases; under bf16/fp16 autocast
    # the matmuls still run in the compute dtype, so these are the usual float32 master weights.
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    if use_compile:
        perf.compile_layers(trainer.model, recomputed=lambda index: index in recomputed)
        if cache is not None:  # compilation happens on first use: the cache is in place before the first forward pass
            cache.load(resume)
    elif cfg.torch_compile == "true" and cuda:
        log.warning("torch_compile skipped: Triton needs a C compiler to build its launcher and none is installed")
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our Throughput callback logs each step once, via logging
    return trainer


def check_lora_targets(model: Any, targets: str | list[str]) -> None:
    """Every module name in QLORA_LORA_TARGET_MODULES must name modules of this model: peft adapts the names that
    match and drops the others without a word (a misspelt `value_proj` beside `q_proj` trained q_proj alone)."""
    if targets == "all-linear":
        return
    names = [name for name, _ in model.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        head = model.get_output_embeddings()
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if hasattr(module, "in_features") and module is not head})
        raise ConfigError([f"{env_name('lora_target_modules')}={','.join(targets)!r}: {', '.join(unmatched)} match no"
                           f" module of this model; its layers' linear modules are {', '.join(linear)} (or use"
                           " all-linear)"])


def early_stopping_callback(patience: int, threshold: float):
    from transformers import EarlyStoppingCallback

    class EarlyStopping(EarlyStoppingCallback):
        """transformers' early stopping, which also saves a checkpoint at the evaluation that stops training: the
        checkpoint then records the stop (its count of evaluations without improvement), and a rerun after a later
        failure (upload, merge) takes the run as finished instead of training on past the stop."""

        def on_evaluate(self, args, state, control, metrics, **kwargs):
            ending = control.should_training_stop  # the last step (saved anyway), or the evaluation after training
            super().on_evaluate(args, state, control, metrics, **kwargs)
            if not ending and control.should_training_stop and self.stopped:
                control.should_save = True
                log.info("early stopping at step %d: the eval loss has not improved on %.6g (step %s) for %d"
                         " evaluation(s)", state.global_step, state.best_metric, state.best_global_step,
                         self.early_stopping_patience_counter)
            return control

        @property
        def stopped(self) -> bool:
            return self.early_stopping_patience_counter >= self.early_stopping_patience

    return EarlyStopping(patience, threshold)


def _throughput_callback(tracker: Any):
    from transformers import TrainerCallback

    class Throughput(TrainerCallback):
        """Adds trained-tokens-per-second (non-padding tokens, from TRL's `num_tokens`; seq2seq: the encoder's input
        tokens the Trainer counts) to the logs, and times this run's optimizer steps: the first apart (it holds
        torch.compile's compilation, or its load from the compile cache) from the steady ones after it (`timing`)."""

        def __init__(self) -> None:
            self.last: tuple[float, float] | None = None
            self.started: float | None = None
            self.first_step: int = 0
            self.first_end: float | None = None
            self.last_end: float | None = None
            self.last_step: int = 0

        def on_train_begin(self, args, state, control, **kwargs):
            _synchronize(args)
            self.started, self.first_step = time.perf_counter(), state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            # The GPU is waited for at the first step's end and at the last step's (two waits a run): the times are
            # the GPU's work, not only its queueing.
            first = state.global_step == self.first_step + 1
            if first or state.global_step >= state.max_steps or control.should_training_stop:
                _synchronize(args)
            now = time.perf_counter()
            if first:
                self.first_end = now
                if state.is_world_process_zero and self.started is not None:
                    log.info("first optimizer step of this run: %.1f s (it holds the compilation, when the layers are"
                             " compiled)", now - self.started)
            self.last_end, self.last_step = now, state.global_step

        def timing(self) -> dict[str, Any]:
            """first_step_seconds: this run's first optimizer step; steady_step_seconds: the mean of the steps after
            it (including the periodic evaluations and checkpoint saves between them); steady_steps: how many."""
            if self.started is None or self.first_end is None:
                return {}
            steady = self.last_step - self.first_step - 1
            return {"first_step_seconds": round(self.first_end - self.started, 2),
                    "steady_step_seconds": round((self.last_end - self.first_end) / steady, 3) if steady > 0 else None,
                    "steady_steps": steady}

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs:
                return
            counted = logs.get("num_tokens")
            if counted is None and not any(k.startswith("eval_") for k in logs):
                counted = logs.get("num_input_tokens_seen")
            if counted is None:
                return
            now, tokens = time.monotonic(), float(counted)
            if self.last is not None and now > self.last[0] and tokens > self.last[1]:
                rate = (tokens - self.last[1]) / (now - self.last[0])
                logs["tokens_per_second"] = round(rate, 1)
                tracker.log({"train/tokens_per_second": rate, "train/global_step": state.global_step})
            self.last = (now, tokens)
            if state.is_world_process_zero:
                shown = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in logs.items()}  # 4 significant digits: a learning rate of 2e-05 is not 0.0
                log.info("step %d/%d %s", state.global_step, state.max_steps, json.dumps(shown))

    return Throughput()


def _synchronize(args: Any) -> None:
    device = getattr(args, "device", None)
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def step_timing(trainer: Any) -> dict[str, Any]:
    """The Throughput callback's timing of this run's optimizer steps ({} when none ran)."""
    for callback in trainer.callback_handler.callbacks:
        if hasattr(callback, "timing"):
            return callback.timing()
    return {}


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
        if found is not None:
            localize_best(found)
        return found

    # One process per host restores and prunes the (host-local) checkpoint directory; its ranks share the answer.
    resume = ranks.on_host_leader(tidy_checkpoints, "checkpoint restore")
    if len(set(ranks.gather(resume.name if resume else None))) > 1:
        raise ConfigError([f"the hosts of this job would resume from different checkpoints in {ckpt_dir} (one host's"
                           " disk was replaced, the others' kept): set QLORA_CHECKPOINT_URI, which every host restores"
                           " the same checkpoint from, or QLORA_RESUME=false to start over"])
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
    recorded = checkpoint_total_steps(resume) if resume else None
    if resume and recorded is not None and recorded != total:
        if not (resumed_at == recorded and total > recorded):
            raise ConfigError([f"{resume} is step {resumed_at} of a run planned for {recorded} steps, and this run"
                               f" plans {total} (max_steps or num_epochs changed): its learning-rate schedule was"
                               f" laid out for {recorded} steps, so resuming would publish neither run. Set them back"
                               f" so the run ends at step {recorded}, or set QLORA_RESUME=false to start over (a"
                               " finished run may be extended: resume it with more steps)"])
        log.warning("extending the finished %d-step run of %s to %d steps: the learning-rate schedule now spans %d"
                    " steps, so it resumes at its step %d", recorded, resume, total, total, resumed_at)
    if resume and (resumed_at == total or stopped_early(resume)):
        # The checkpoint is the finished run (a rerun after a stop during eval, merge or upload): take its adapter
        # (its best one, with periodic evaluation) as it is. The Trainer would run one more step before noticing
        # there is nothing left to do.
        log.info("resuming from %s: it is this run's last step (%d%s), nothing is left to train", resume, resumed_at,
                 ", where early stopping ended it" if resumed_at < total else "")
        best = best_checkpoint(resume)
        load_adapter_weights(trainer.model, best)
        trainer.state.global_step = resumed_at
        return {"train_loss": None, "global_step": resumed_at, "steps_this_run": 0, "train_runtime_seconds": 0.0,
                "resumed_from": resume.name, **best_of(saved_state(resume), resumed_at < total)}
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
                        f" {ckpt_dir}; to resume: " + (f"python launch/submit.py <the same flags> --resume-from"
                                                       f" {cfg.checkpoint_uri or cfg.run_name}"
                                                       if cfg.checkpoint_uri or cfg.run_name else
                                                       "run the job again with the same settings"))
    early = any(getattr(cb, "stopped", False) for cb in trainer.callback_handler.callbacks)
    if int(result.global_step) != total and not early:
        raise JobError(f"training ended at step {result.global_step}, not at the planned step {total}: the adapter"
                       " is not published. This is a bug; the checkpoints are kept")
    state = trainer.state
    timing = step_timing(trainer)
    if timing.get("steady_step_seconds") is not None:
        log.info("training: the first optimizer step took %.1f s, the %d after it %.3f s each",
                 timing["first_step_seconds"], timing["steady_steps"], timing["steady_step_seconds"])
    return {"train_loss": float(result.training_loss), "global_step": int(result.global_step),
            "steps_this_run": int(result.global_step) - resumed_at,
            "train_runtime_seconds": round(float(result.metrics.get("train_runtime", 0.0)), 1), **timing,
            "resumed_from": resume.name if resume else None,
            **best_of({"best_global_step": state.best_global_step, "best_metric": state.best_metric}, early)}


def best_of(state: dict[str, Any], early: bool) -> dict[str, Any]:
    """What the result says about the best evaluation (periodic evaluation only) and early stopping."""
    if not state.get("best_global_step"):
        return {}
    return {"best_step": int(state["best_global_step"]), "best_eval_loss": float(state["best_metric"]),
            "stopped_early": early}


def saved_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json ({} when it cannot be read)."""
    try:
        return json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return {}


def stopped_early(checkpoint: Path) -> bool:
    """Whether early stopping ended the run at this checkpoint (its saved count reached the patience)."""
    saved = saved_state(checkpoint).get("stateful_callbacks", {}).get("EarlyStopping")
    for entry in saved if isinstance(saved, list) else [saved] if saved else []:
        args, attributes = entry.get("args", {}), entry.get("attributes", {})
        if attributes.get("early_stopping_patience_counter", 0) >= args.get("early_stopping_patience", 1):
            return True
    return False


def best_checkpoint(checkpoint: Path) -> Path:
    """The checkpoint of the best evaluation that `checkpoint`'s state names (in the same directory), else itself."""
    named = saved_state(checkpoint).get("best_model_checkpoint")
    if not named:
        return checkpoint
    best = checkpoint.parent / Path(named).name
    if not (best / "adapter_model.safetensors").is_file():
        log.warning("%s names %s as its best checkpoint, which is gone: its own adapter is published instead",
                    checkpoint, best.name)
        return checkpoint
    return best


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


def gather_adapter(trainer: Any) -> dict[str, Any] | None:
    """Under FSDP, the LoRA weights gathered whole from their shards into world rank 0's CPU memory (torch's
    full state dict without the frozen 4-bit weights); every rank must call it (it is a collective), and the
    other ranks get an empty dict. None without FSDP: the model holds its whole adapter."""
    if not trainer.is_fsdp_enabled:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    gathered = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                            ignore_frozen_params=True))
    return {name: tensor.detach().clone() for name, tensor in gathered.items()}  # owned copies, not views of buffers


def save_adapter(trainer: Any, tokenizer: Any, stage: Path, base_model_name: str, compute_dtype: str,
                 gathered: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Save the adapter and tokenizer to `stage`/adapter, naming the base model by `base_model_name` (where it came
    from: a Hub id, an s3:// prefix), not by the scratch copy it was loaded from, in adapter_config.json and in
    peft's own README.md. `gathered`: the adapter of a sharded model (gather_adapter). Returns the directory and what
    the adapter is: dtype, parameters, bytes."""
    from safetensors import safe_open

    model = trainer.model
    for config in model.peft_config.values():
        config.base_model_name_or_path = base_model_name
    base = model.get_base_model()  # peft's README.md names it as base_model and in a base_model:adapter: tag
    base.name_or_path = base.config.name_or_path = base_model_name
    adapter_dir = stage / "adapter"
    model.save_pretrained(adapter_dir, safe_serialization=True, **({"state_dict": gathered} if gathered else {}))
    tokenizer.save_pretrained(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        slices = [f.get_slice(key) for key in f.keys()]  # noqa: SIM118 - safe_open has no __iter__
        dtypes = sorted({str(s.get_dtype()) for s in slices})
        parameters = sum(math.prod(s.get_shape()) for s in slices)
    info = {"dtype": ",".join(DTYPE_NAMES.get(d, d) for d in dtypes), "parameters": parameters,
            "bytes": weights.stat().st_size, "compute_dtype": compute_dtype}
    # LoRA weights are kept in float32 in training (build_trainer), and peft saves them as they are.
    log.info("adapter: %s parameters in %s, %s bytes (%s); the 4-bit base computes in %s", f"{parameters:,}",
             info["dtype"], f"{info['bytes']:,}", weights, compute_dtype)
    return adapter_dir, info


DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # safetensors' names -> torch's
