"""The training job: QLoRA SFT of a Llama-class model (or a T5-class encoder-decoder), configured by QLORA_* variables.

    python -m entrypoints.train [--name value ...]      # what the container's `train` command runs

Steps (main -> run): resolve secrets and the output location -> fetch and check the eval suites, then data and
model -> the model's kind (a T5-class encoder-decoder is trained as seq2seq: `settings_for_model`, and a few steps
branch on it) -> tokenize -> load the 4-bit model -> eval, sample answers and the suites' answers of the base model
-> train (resuming from the newest complete checkpoint; with periodic eval, the best evaluation's adapter is kept) ->
eval and answers after -> save the adapter -> merge -> the promotion gate (versioned outputs) -> model card +
manifest -> publish (manifest last; latest.json only when promoted) -> (optional) publish to the Hugging Face Hub ->
print a summary. Exit codes: entrypoints/errors.py and the README.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from entrypoints import bnb4bit, compile_cache, perf, storage
from entrypoints.checkpoints import (
    StopFlag,
    content_sha256,
    file_sha256s,
    model_files,
    run_fingerprint,
)
from entrypoints.config import JobConfig, env_name, help_text, parse_config, seq2seq_config
from entrypoints.data import list_data_files
from entrypoints.dataset import TokenizedData, prepare_data
from entrypoints.errors import (
    ConfigError,
    ModelError,
    NotPromoted,
    Preempted,
    StorageError,
    disk_space_for,
    run_guarded,
)
from entrypoints.evaluation import (
    answer_match,
    answer_suites,
    base_model,
    check_scorers,
    evaluate,
    generate_answers,
    suite_report,
)
from entrypoints.hub import HubTarget, check_token, publish_result, raise_if_failed
from entrypoints.modeling import (
    cap_gpu_memory,
    compute_dtype,
    device_kind,
    is_seq2seq,
    load_model,
    load_model_config,
    resolve_model,
    settings_for_checkpoint,
    stored_quantization,
)
from entrypoints.outputs import (
    OutputClaim,
    OutputTarget,
    Publisher,
    build_manifest,
    write_model_card,
)
from entrypoints.paths import DEFAULT_BASE_DIR, container_paths
from entrypoints.promotion import Decision, gate
from entrypoints.ranks import RankFailed, Ranks, exit_lost, join_ranks, leave_process_group
from entrypoints.secrets import install_redactor, resolve_secrets
from entrypoints.sizing import BatchPlan, Parallelism, PlanSettings
from entrypoints.suites import Suite, fetch_suites
from entrypoints.templating import load_tokenizer_and_template
from entrypoints.tracking import NullTracker, WandbTracker, wandb_wanted
from entrypoints.trainer import (
    build_trainer,
    check_trained,
    find_checkpoint,
    gather_adapter,
    save_adapter,
    train,
)

log = logging.getLogger("qlora")
SUMMARY_PREFIX = "QLORA_SUMMARY "  # the last stdout line: one JSON object a caller can parse


@dataclass
class Inputs:
    data: list[Path]  # one local copy per source of `data` (several: a mix), in its order
    eval_data: Path | None
    model_dir: Path
    data_files: list[list[Path]]  # the data files of each source
    eval_files: list[Path] = field(default_factory=list)
    content: dict[str, str | None] = field(default_factory=dict)  # sha256 of data, eval data and model files
    source_sha256s: list[str] = field(default_factory=list)  # sha256 of each data source's files
    suites: list[Suite] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- steps
def resolve_inputs(cfg: JobConfig, work: Path, hf_token: str | None) -> Inputs:
    endpoint = cfg.s3_endpoint_url
    # The suites first: small, and a bad one fails the job in seconds, before the data and model downloads.
    suites = fetch_suites(cfg.eval_suite, work / "suites", endpoint, chat=cfg.data_format != "text")
    if suites:
        check_scorers()
    for suite in suites:
        log.info("eval suite %s: %d question(s) from %s (sha256 %s)", suite.name, len(suite.items), suite.uri,
                 suite.sha256[:12])
    sources = cfg.data_sources
    # One source keeps the folder it always had; the sources of a mix each get their own.
    data = [storage.fetch(uri, work / "data" / ("train" if len(sources) == 1 else f"train-{i}"), endpoint_url=endpoint)
            for i, uri in enumerate(sources, 1)]
    eval_data = storage.fetch(cfg.eval_data, work / "data" / "eval", endpoint_url=endpoint) if cfg.eval_data else None
    model_dir = resolve_model(cfg, work, hf_token)
    inputs = Inputs(data, eval_data, model_dir, [list_data_files(d) for d in data],
                    list_data_files(eval_data) if eval_data else [], suites=suites)
    inputs.content = content_fingerprints(inputs, work, cfg.data_mix_weights, cfg.data_mix_stopping)
    return inputs


def content_fingerprints(inputs: Inputs, work: Path, weights: list[float] | None = None,
                         mix_stopping: str = "") -> dict[str, str | None]:
    """sha256 of the bytes this run trains on: the training data, the eval data and the base model's files. The data
    of a mix: over each source's content in order, its weight and how the mix ends, so that a resumed run with other
    sources or weights does not continue the checkpoints of this one, and the eval set it holds out is named apart."""
    cache = work / "sha256-cache.json"
    train = file_sha256s([f for files in inputs.data_files for f in files], cache)
    held_out = file_sha256s(inputs.eval_files, cache)
    same = sorted(str(p) for p, digest in held_out.items() if digest in set(train.values()))
    if same:
        log.warning("%d eval file(s) hold the same bytes as a training file (%s): the eval loss and the answers are"
                    " measured on training data, not held out", len(same), ", ".join(same[:3]))
    per_source = [content_sha256(files, _root(path), digests=train)
                  for path, files in zip(inputs.data, inputs.data_files, strict=True)]
    inputs.source_sha256s = per_source
    if len(per_source) == 1:
        data_sha256 = per_source[0]
    else:
        mix = {"sources": per_source, "weights": weights, "stopping": mix_stopping if weights else None}
        data_sha256 = hashlib.sha256(json.dumps(mix, sort_keys=True).encode()).hexdigest()
    return {
        "data_sha256": data_sha256,
        "eval_data_sha256": content_sha256(inputs.eval_files, _root(inputs.eval_data), digests=held_out)
        if inputs.eval_files else None,
        "model_sha256": content_sha256(model_files(inputs.model_dir), inputs.model_dir, cache),
    }


def _root(path: Path | None) -> Path | None:
    return None if path is None else (path.parent if path.is_file() else path)


# ------------------------------------------------------------------------------------------- job
_HELD_LOCKS: list[Any] = []  # open lock files: each lock lives as long as its file stays open


def lock_local_dirs(cfg: JobConfig) -> None:
    """Hold an exclusive lock on the work and checkpoint directories for the life of the process: a second job
    started on the same directories (a rerun while the first still runs, two schedules on one base dir) would
    otherwise overwrite the first one's downloads, data caches and checkpoints. The kernel releases the locks when
    the process ends, however it ends, so a killed job never leaves a stale lock."""
    import fcntl
    import socket

    folders = {cfg.paths.work_dir.resolve(): "base_dir", cfg.checkpoint_path.resolve(): "checkpoint_dir"}
    for folder, setting in folders.items():  # one lock when both settings name the same directory
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
    ranks = join_ranks(env, cfg.distributed_timeout_seconds)
    # World rank 0 claims the output (picking the versioned prefix) before any download or GPU work; every rank fails
    # alike on a conflict. The claim is given up however the run ends, preemption included.
    claim = OutputClaim(cfg.output_uri, cfg.output_exists, cfg.s3_endpoint_url, record=work / "output-claim.json",
                        owner=job_identity(cfg, env))
    try:
        # A host's ranks share its directories; its local rank 0 holds them for the job.
        ranks.on_host_leader(lambda: lock_local_dirs(cfg), "the directory locks")
        target = ranks.on_world_leader(claim.acquire, "the output claim")
        log.info("output: %s%s", target.uri, " (versioned run)" if target.versioned else "")
        return _run_claimed(cfg, secrets, env, stop, ranks, target, claim, started)
    except Exception as exc:
        # Another process of the job is gone (a host killed or lost): say which, with the job's own exit code,
        # rather than a library's connection error as an internal error.
        lost = ranks.lost_peer(exc)
        if lost is None:
            raise
        raise lost from exc
    finally:
        claim.release()  # a no-op on the ranks that claimed nothing


def _run_claimed(cfg: JobConfig, secrets: Mapping[str, str], env: Mapping[str, str], stop: StopFlag, ranks: Ranks,
                 target: OutputTarget, claim: OutputClaim, started: float) -> dict[str, Any]:
    work = cfg.paths.work_dir
    inputs = ranks.on_host_leader(lambda: resolve_inputs(cfg, work, secrets.get("HF_TOKEN")), "the input downloads")
    cfg, seq2seq = settings_for_model(cfg, inputs.model_dir)
    if ranks.is_main:
        check_disk_space(cfg, inputs.model_dir)
    tokenizer, template = load_tokenizer_and_template(cfg, inputs.model_dir, seq2seq)
    with disk_space_for(work / "datasets-cache", "tokenizing the data"):
        data = ranks.host_leader_first(lambda: prepare_data(cfg, inputs.data, inputs.eval_data, tokenizer, template,
                                                            fresh_cache=ranks.is_local_main, seq2seq=seq2seq),
                                       "data preparation")
    stop.check("while the data was prepared")
    plan, fingerprint, parallel = plan_run(cfg, inputs, data, ranks, seq2seq)
    resume = find_checkpoint(cfg, fingerprint, ranks)
    # One W&B run per job: transformers' WandbCallback logs from world rank 0 only, so only it opens the run.
    tracker = (WandbTracker(cfg.wandb_project, cfg.wandb_entity, cfg.run_name, cfg.to_public_dict(), work / "wandb")
               if ranks.is_main and wandb_wanted(cfg.report_to, {**env, **secrets}) else NullTracker())
    exit_code = 1
    try:
        model = load_model(inputs.model_dir, cfg, ranks.local_rank, seq2seq)
        trainer = build_trainer(cfg, model, tokenizer, data, tracker, stop, plan, fingerprint, seq2seq, parallel,
                                resume)
        stop.check("while the model was loaded")
        # A peer lost while training ends this process at once, with exit 10 and the output claim given up.
        watch = ranks.watching_peers(lambda lost: exit_lost(lost, cfg.paths.failure_file, claim.release))
        metrics, samples, suites = train_and_evaluate(cfg, trainer, tokenizer, template, data, stop, resume,
                                                      inputs.suites, seq2seq, watch)
        if plan is not None:  # in the manifest: how this run fitted its memory
            metrics["batch_plan"] = perf.plan_record(plan, trainer.args.optim)
        metrics["parallelism"] = {"mode": parallel.mode, "processes": parallel.processes, "reason": parallel.reason}
        cache = compile_cache.of(trainer)
        if cache is not None:  # in the manifest: what the compiled layers loaded and saved
            metrics["compile_cache"] = cache.record()
        stop.check("after training (during eval or the sample answers)")
        gathered = gather_adapter(trainer)  # sharded: every rank sends its shard of the adapter to rank 0
        if not trainer.is_world_process_zero():
            # The other ranks wait for world rank 0's merge and upload and end with its outcome: one job, one exit
            # code on every host (a host that exited 0 while rank 0 failed would leave a Kubernetes retry of rank 0
            # waiting at the rendezvous for hosts that are gone). Rank 0 lost meanwhile: exit 10 (run's handler).
            del trainer, model
            _free_memory()
            outcome = ranks.on_world_leader(lambda: {}, "the outputs (merge and upload)")
            exit_code = 0
            return {FOLLOWER: True, **outcome}
        try:
            tracker.log_samples("samples", samples)
            for suite in suites:
                tracker.log_samples(f"suite/{suite['name']}", [
                    {"source": i["source"], "prompt": i["prompt"], "reference": i["reference"], "metric": i["metric"],
                     "before": i["before"], "after": i["after"], "score_before": i["scores_before"][i["metric"]],
                     "score_after": i["scores_after"][i["metric"]]} for i in suite["items"]])
            tracker.summary({**{k: v for k, v in metrics.items() if v is not None}, **suite_summaries(suites),
                             **mix_summary(data.stats.get("mix", []))})
            stage = work / "output"
            with disk_space_for(stage, "writing the outputs"):
                shutil.rmtree(stage, ignore_errors=True)
                stage.mkdir(parents=True)
                publisher = Publisher(stage, target, cfg.s3_endpoint_url, claim)
                adapter_dir, metrics["adapter"] = save_adapter(trainer, tokenizer, stage, cfg.base_model_name,
                                                               str(compute_dtype(cfg)).removeprefix("torch."), gathered)
                for path in storage.iter_tree(adapter_dir):
                    publisher.submit(path)
                del trainer, model  # the merge needs the memory the 4-bit model holds
                _free_memory()
                manifest_uri, decision = publish(cfg, inputs, data, stage, publisher, adapter_dir, metrics, samples,
                                                 suites, seq2seq)
            if decision is not None:
                tracker.summary({f"promotion/{k}": v for k, v in decision.as_dict().items() if v is not None})
            # The output is complete: a failed Hub publish is reported in the summary, and main() then exits 9. A run the
            # gate did not promote is not published to the Hub either.
            hub = None
            if decision is None or decision.promoted:
                hub = publish_result(HubTarget.of(cfg), stage, secrets.get("HF_TOKEN"), target.uri)
            elif cfg.hub_repo:
                log.info("not published to the Hub (%s): the run was not promoted", cfg.hub_repo)
            exit_code = 0
            summary = {"output": target.uri, "manifest": manifest_uri, **metrics, "samples": samples,
                       "suites": {s["name"]: {k: s[k] for k in ("count", "before", "after")} for s in suites},
                       "promotion": decision.as_dict() if decision else None,
                       "wall_seconds": round(time.monotonic() - started, 1), **({"hub": hub} if hub else {})}
        except BaseException as exc:
            if ranks.world_size > 1:  # the other ranks are waiting: they end with this error's exit code too
                ranks.on_world_leader(functools.partial(_reraise, exc), "the outputs (merge and upload)")
            raise
        # What the other ranks end with (they wait for it above): the parts of the summary main() decides exits on.
        ranks.on_world_leader(lambda: {k: summary.get(k) for k in ("output", "hub", "promotion")},
                              "the outputs (merge and upload)")
        return summary
    finally:
        tracker.finish(exit_code)


def check_disk_space(cfg: JobConfig, model_dir: Path) -> None:
    """Log the free space of every place the job writes, and fail before any training when the outputs cannot fit:
    the merged model is about as large as the base's weights (the same dtype; a pre-quantized base's dequantized),
    written to the staging directory
    (and copied again to a local output on another file system). The model download was checked when it ran."""
    places = {"work (downloads, data caches, staging)": cfg.paths.work_dir, "checkpoints": cfg.checkpoint_path}
    if not storage.is_s3(cfg.output_uri):
        places["output"] = Path(cfg.output_uri)
    free = {name: storage.free_bytes(path) for name, path in places.items()}
    log.info("disk: %s", ", ".join(f"{name} {path}: {free[name] / 2**30:.1f} GiB free" for name, path in places.items()))
    if not cfg.merge:
        return
    stored = stored_quantization(model_dir)
    # A pre-quantized base's merged model holds its 4-bit weights dequantized: about 3.5 times its files.
    weights = (bnb4bit.dequantized_bytes(model_dir, 4 if stored.dtype == "float32" else 2) if stored is not None
               else sum(p.stat().st_size for p in model_dir.glob("*.safetensors")))
    needs: dict[int, list[str]] = {}  # file system -> the places the merged model is written to on it
    for name in ("work (downloads, data caches, staging)", "output"):
        if name in places:
            needs.setdefault(_device(places[name]), []).append(name)
    for names in needs.values():
        need, have = weights * len(names), free[names[0]]
        if need > have:
            where = " and ".join(f"{places[n]} ({n})" for n in names)
            raise StorageError(f"not enough disk space for the merged model in {where}: it needs about"
                               f" {need / 2**30:.1f} GiB (the size of the merged model's weights{' twice' if len(names) > 1 else ''}),"
                               f" and {have / 2**30:.1f} GiB are free. Give the job a larger volume (SageMaker:"
                               " volume_size; Kubernetes: the scratch volume), or set QLORA_MERGE=false to publish"
                               " the adapter only")


def _device(path: Path) -> int:
    for candidate in (path, *path.parents):
        try:
            return os.stat(candidate).st_dev
        except OSError:
            continue
    return -1


def settings_for_model(cfg: JobConfig, model_dir: Path) -> tuple[JobConfig, bool]:
    """The settings this model trains with, and whether it is a T5-class encoder-decoder (trained as seq2seq: the
    settings that do not apply to it are refused when given and left out, with one log line, when not). A
    pre-quantized checkpoint's quantization is its own (`settings_for_checkpoint`)."""
    cfg = settings_for_checkpoint(cfg, model_dir)
    if not is_seq2seq(model_dir, cfg):
        return cfg, False
    cfg, ignored = seq2seq_config(cfg)
    log.info("encoder-decoder model: trained as seq2seq on (input, target) pairs%s",
             f"; settings that do not apply to it, ignored at their defaults: {', '.join(ignored)}" if ignored else "")
    return cfg, True


def plan_run(cfg: JobConfig, inputs: Inputs, data: TokenizedData, ranks: Ranks, seq2seq: bool = False
             ) -> tuple[BatchPlan | None, dict, Parallelism]:
    """The parallelism (DDP or FSDP, from the memory model: sizing.choose_parallelism), the batch plan (packed
    micro-batches sized from the GPU's memory, capped first when max_gpu_memory_gib is set; docs/PERF.md) and the
    run's fingerprint. Planned from the model's config, before the model is loaded, so that a checkpoint of other
    inputs or settings is refused before minutes of loading."""
    if device_kind() == "cuda":
        cap_gpu_memory(cfg.max_gpu_memory_gib, ranks.local_rank)
    model_config = load_model_config(inputs.model_dir, cfg)
    settings = PlanSettings.of(cfg)
    parallel = perf.parallelism_for(settings, None if seq2seq else model_config, ranks.world_size)
    if parallel.mode == "fsdp" and device_kind() != "cuda":
        raise ConfigError([f"{env_name('parallelism')}=fsdp: FSDP runs on CUDA GPUs only (accelerate does not shard"
                           f" across CPU processes; it would train DDP instead); use {env_name('parallelism')}=ddp"
                           " (or auto) here"])
    if ranks.is_main:
        log.info("parallelism: %s over %d process(es): %s", parallel.mode, parallel.processes, parallel.reason)
    plan = None
    if cfg.packing:
        try:
            plan = perf.plan_for(settings, model_config, data.stats, parallel.shards)
        except ValueError as exc:
            raise ModelError(f"{inputs.model_dir}/config.json: {exc}. The job fine-tunes Llama-class causal language"
                             " models (Llama, Mistral, Qwen, SmolLM...): point QLORA_MODEL at one") from None
    if plan is not None:
        log.info("batch plan: %s", plan)
    batch = ({"rows": plan.rows, "row_tokens": plan.row_tokens, "accumulation": plan.gradient_accumulation_steps}
             if plan else {"rows": cfg.micro_batch_size, "accumulation": cfg.gradient_accumulation_steps})
    if plan is not None and plan.optim:
        batch["optimizer"] = plan.optim  # the plan's pick for optim=auto: its checkpoints hold that optimizer's state
    # A sharded run's checkpoints hold FSDP's optimizer state: only a run sharded the same way resumes from them.
    sharding = {"parallelism": "fsdp"} if parallel.mode == "fsdp" else {}
    return plan, run_fingerprint(cfg.to_public_dict(), inputs.content, {**batch, "processes": ranks.world_size,
                                                                         **sharding}), parallel


def train_and_evaluate(cfg: JobConfig, trainer: Any, tokenizer: Any, template: str | None, data: TokenizedData,
                       stop: StopFlag, resume: Path | None, suites: list[Suite], seq2seq: bool = False,
                       watch: contextlib.AbstractContextManager | None = None
                       ) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Eval loss, sample answers and the suites' answers of the base model, training (or the finished checkpoint
    taken as it is), the check that it trained something, eval loss and answers after: the metrics, the samples and
    the suites' reports (world rank 0 answers). `watch`: the context training runs in (the ranks' heartbeat)."""
    main = trainer.is_world_process_zero()
    fsdp = trainer.is_fsdp_enabled

    def sharded() -> bool:
        """Whether the Trainer has sharded the model yet (FSDP2 shards it in place when training starts)."""
        from torch.distributed.fsdp import FSDPModule

        return fsdp and isinstance(trainer.model, FSDPModule)

    def generating() -> bool:
        # A sharded model's forward passes gather weights from every rank: all ranks generate, rank 0 keeps the answers.
        return main or sharded()

    def answer() -> list[str]:
        return (generate_answers(trainer.model, tokenizer, template, data.samples, cfg.max_new_tokens,
                                 cfg.generation_batch_size, seq2seq) if generating() and data.samples else [])

    def ask_suites(when: str) -> tuple[dict[str, list[str]], dict[str, float]]:
        return answer_suites(trainer.model, tokenizer, template, suites, cfg.max_new_tokens,
                             cfg.generation_batch_size, seq2seq, when) if generating() else ({}, {})

    def eval_loss() -> float | None:
        if fsdp and not sharded() and data.eval is not None:
            # transformers' evaluate() prepares an unprepared FSDP2 model without its optimizer, which accelerate
            # refuses; the unsharded model is only there before training, so this eval is left out.
            log.warning("eval loss before training: not measured under FSDP (transformers cannot evaluate an FSDP2"
                        " model before training prepares it)")
            return None
        return evaluate(trainer, data.eval is not None)

    eval_before, before = eval_loss(), answer()
    with base_model(trainer.model):  # the adapter is the identity before training; off, whatever it holds
        suites_before, seconds_before = ask_suites("before")
    log.info("eval loss before training: %s", eval_before)
    stop.check("before training (during the first eval or sample answers)")
    with watch if watch is not None else contextlib.nullcontext():
        result = train(trainer, cfg, stop, resume)
    check_trained(trainer.model, result, cfg)
    eval_after, after = eval_loss(), answer()
    suites_after, seconds_after = ask_suites("after")
    log.info("eval loss after training: %s", eval_after)
    reports = [suite_report(s, suites_before[s.name], suites_after[s.name], cfg.max_new_tokens,
                            {"before": seconds_before[s.name], "after": seconds_after[s.name]})
               for s in suites] if main else []
    for report in reports:
        log.info("eval suite %s (%d): %s", report["name"], report["count"], ", ".join(
            f"{m} {report['before'][m]:.3f} -> {report['after'][m]:.3f}" for m in ("score", "exact_match", "contains",
                                                                                  "token_f1", "rouge_l")))
    metrics = {"eval_loss_before": eval_before, "eval_loss_after": eval_after,
               "answer_match_before": answer_match(before, data.samples),
               "answer_match_after": answer_match(after, data.samples), **result, "device": device_kind()}
    if cfg.max_steps < 0 and result["steps_this_run"] and result["train_runtime_seconds"] > 0:
        share = result["steps_this_run"] / max(result["global_step"], 1)  # of the epochs' tokens, this run's
        metrics["approx_tokens_per_second"] = round(
            data.stats["train_tokens"] * cfg.num_epochs * share / result["train_runtime_seconds"], 1)
    samples = [{"prompt": s["prompt"], "reference": s["reference"], "before": b, "after": a}
               for s, b, a in zip(data.samples, before, after, strict=True)] if main and data.samples else []
    return metrics, samples, reports


def mix_summary(mix: list[dict[str, Any]]) -> dict[str, Any]:
    """`data/mix/<n>/...`: what each source of a mix gave (W&B's summary; its config holds the sources and weights)."""
    return {f"data/mix/{n}/{key}": source[key] for n, source in enumerate(mix, 1)
            for key in ("source", "weight", "records_read", "train_records", "train_share", "eval_records")
            if source[key] is not None}


def suite_summaries(suites: list[dict[str, Any]]) -> dict[str, float]:
    """`suite/<name>/<metric>_before|after`: the suites' summaries as flat metrics (W&B's summary)."""
    return {f"suite/{s['name']}/{metric}_{when}": s[when][metric] for s in suites for when in ("before", "after")
            for metric in s[when]}


def publish(cfg: JobConfig, inputs: Inputs, data: TokenizedData, stage: Path, publisher: Publisher, adapter_dir: Path,
            metrics: dict[str, Any], samples: list[dict[str, Any]], suites: list[dict[str, Any]],
            seq2seq: bool = False) -> tuple[str, Decision | None]:
    """Merge, write the suites' answers, decide the promotion (versioned outputs), write the model card and the
    manifest, and publish what is left (the manifest last; latest.json only when promoted)."""
    stored = stored_quantization(inputs.model_dir)
    evaluation = {}
    for suite in suites:
        answers = stage / "evaluation" / f"{suite['name']}.jsonl"
        answers.parent.mkdir(parents=True, exist_ok=True)
        answers.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in suite["items"]),
                           encoding="utf-8")
        publisher.submit(answers)
        evaluation[suite["name"]] = {**{k: v for k, v in suite.items() if k not in ("name", "items")},
                                     "answers": answers.relative_to(stage).as_posix()}
    if cfg.merge:
        from entrypoints.merge import merge_adapter

        log.info("merging the adapter into the 16-bit base model%s",
                 " (the pre-quantized base's 4-bit weights, dequantized)" if stored else "")
        # Into the base as the adapter saw it in training (nf4/fp4 round trip): measured closest to
        # the trained model (docs/MERGE.md); plain LoRA merges into the original weights.
        merge_into = {"nf4": "nf4", "fp4": "fp4", "none": "original"}[cfg.quantization]
        merge_summary = merge_adapter(inputs.model_dir, adapter_dir, stage / "merged", merge_into=merge_into,
                                      double_quant=cfg.double_quant, on_file_written=publisher.submit)
        metrics["merge"] = {k: v for k, v in merge_summary.items() if isinstance(v, (str, int, float, bool))}
    extra: dict[str, Any] = {
        "base_model": {"source": cfg.model, "name": cfg.base_model_name, "revision": cfg.model_revision,
                       "fingerprint_sha256": inputs.content["model_sha256"],
                       # a pre-quantized base: the form its weights are stored (and were trained) in
                       "stored_quantization": stored.as_dict() if stored else None},
        "data": {"source": cfg.data, "eval_source": cfg.eval_data or None,
                 "fingerprint_sha256": inputs.content["data_sha256"],
                 "eval_fingerprint_sha256": inputs.content["eval_data_sha256"], **data.stats,
                 **({"mix": [{**source, "fingerprint_sha256": digest} for source, digest in
                             zip(data.stats["mix"], inputs.source_sha256s, strict=True)]} if "mix" in data.stats else {})},
        "metrics": metrics, "samples": samples, "evaluation": {"suites": evaluation},
    }
    decision = None
    if publisher.target.versioned:
        decision = gate(cfg.promote_policy, cfg.promote_on, cfg.promote_tolerance,
                        {**extra, "config": cfg.to_public_dict()}, publisher.target.base_uri, cfg.s3_endpoint_url)
        extra["promotion"] = decision.as_dict()
    write_model_card(stage, cfg, {k: v for k, v in metrics.items() if not isinstance(v, dict)}, samples, cfg.merge,
                     adapter=metrics.get("adapter"), seq2seq=seq2seq, suites=suites, promotion=extra.get("promotion"),
                     base_stored=stored.describe() if stored else None)
    manifest = build_manifest(stage, cfg, extra)
    return publisher.finish(manifest, promote=decision is None or decision.promoted), decision


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reraise(exc: BaseException) -> None:
    raise exc


# In run()'s result on the ranks other than world rank 0: the outcome of rank 0's outputs, not a summary to print.
FOLLOWER = "_follower"


def print_summary(summary: Mapping[str, Any]) -> None:
    lines = ["", "=== QLoRA job finished ===", f"output:    {summary.get('output')}",
             f"manifest:  {summary.get('manifest')}",
             f"eval loss: {summary.get('eval_loss_before')} -> {summary.get('eval_loss_after')}",
             f"held-out answer match: {summary.get('answer_match_before')} -> {summary.get('answer_match_after')}",
             f"steps: {summary.get('global_step')}  train loss: "
             f"{'n/a (resumed at the final step)' if summary.get('train_loss') is None else summary.get('train_loss')}"
             f"  train time: {summary.get('train_runtime_seconds')} s  on {summary.get('device')}"]
    if summary.get("best_step"):
        lines.append(f"best eval: step {summary['best_step']} (eval loss {summary['best_eval_loss']:.4f}), the"
                     f" adapter published{'; stopped early' if summary.get('stopped_early') else ''}")
    for name, suite in (summary.get("suites") or {}).items():
        lines.append(f"suite {name} ({suite['count']}): " + "  ".join(
            f"{m} {suite['before'][m]:.3f} -> {suite['after'][m]:.3f}" for m in ("score", "exact_match", "contains",
                                                                               "token_f1", "rouge_l")))
    promotion = summary.get("promotion")
    if promotion:
        lines.append(f"promotion: {'PROMOTED' if promotion['promoted'] else 'NOT PROMOTED'} ({promotion['policy']},"
                     f" {promotion['metric']}): {promotion['reason']}")
    print("\n".join(lines), flush=True)
    print(SUMMARY_PREFIX + json.dumps(summary, default=str), flush=True)


def setup_logging(level: str = "info", rank: int | None = None) -> None:
    """`rank`: under torchrun every rank logs to the same stream, so each line says which rank wrote it."""
    tag = f"rank{rank} " if rank is not None else ""
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stdout,
                        format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s", force=True)
    for noisy in ("httpx", "httpx2", "urllib3", "botocore", "s3transfer", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_known_noise()
    install_redactor()


def quiet_known_noise() -> None:
    """Silence what is understood and harmless, and only that; each line says why."""
    import warnings

    # peft reads `model.is_gradient_checkpointing`, which transformers >= 5.2x renamed: a warning about peft's
    # code, not the job's, and the value it reads is right.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # A T5 v1.1 / Flan-T5 checkpoint stores an LM head of its own beside the `shared` embedding (its config says
    # tie_word_embeddings=false); transformers 5 ties T5's head regardless, finds the two differ and keeps them apart,
    # which is right, and warns that the config should say what it already says.
    logging.getLogger("transformers.modeling_utils").addFilter(
        lambda record: "to tie shared.weight to lm_head.weight" not in record.getMessage())
    # bitsandbytes on CPU first tries the optimized kernels of the `kernels` package (downloaded from the Hub) and
    # falls back to its own CPU kernel, which is what runs here: its warning says nothing is wrong.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # Progress bars of internal steps (datasets' caches, TRL's label building and packing, transformers' weight
    # loading) repeat for every split and fill non-interactive logs (CloudWatch, kubectl logs, CI) with carriage
    # returns: off there, where the job's own log lines say what each step did; kept in a terminal.
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: Sequence[str] | None = None) -> int:
    env = dict(os.environ)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text("python -m entrypoints.train"))
        return 0
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
        check_token(cfg.hub_repo, secrets)
        log.info("settings: %s", json.dumps(cfg.to_public_dict()))
        try:
            summary = run(cfg, secrets, env, stop)
        except (Preempted, RankFailed):
            stop.acknowledge()
            raise
        except BaseException as exc:
            if stop.is_set():
                stop.acknowledge()
                # What the signal interrupted (a worker pool, a download, a library call) may surface as an error of
                # its own: the cause is the signal, and the documented answer to it is exit 75 and a rerun.
                raise Preempted(f"{stop.signal_name} received before a checkpoint could be saved ({type(exc).__name__}"
                                " while stopping); run the job again with the same settings to resume") from None
            raise
        finally:
            release_local_dirs()
        if summary:
            if not summary.get(FOLLOWER):  # world rank 0 prints the summary; every rank ends with its outcome
                print_summary(summary)
            raise_if_failed(summary.get("hub"))
            promotion = summary.get("promotion") or {}
            if promotion and not promotion["promoted"] and promotion["policy"] == "if-not-worse":
                raise NotPromoted(f"the run is complete at {summary['output']}, but latest.json still names"
                                  f" {promotion['previous_run']}: {promotion['reason']}")

    code = run_guarded(job, failure_file, first_failure_wins=distributed)
    if distributed and code == 0:
        leave_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
