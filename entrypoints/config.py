"""The job's configuration contract: every setting, its type, default and one-line doc, in one place.

    python -m entrypoints.config --markdown   # print the table of variables in docs/SETTINGS.md
    python -m entrypoints.config --check      # parse the current environment and print the result

Torch-free: the launcher imports it to validate a job on a laptop before anything is submitted.

Precedence, lowest to highest: defaults < SageMaker `hyperparameters.json` < `QLORA_*` environment
variables < CLI flags (`--max-steps 10` or `--max_steps=10`). All problems are collected and reported
together, each naming where the bad value came from and how to fix it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from entrypoints.errors import ConfigError
from entrypoints.paths import DEFAULT_BASE_DIR, ContainerPaths, container_paths

ENV_PREFIX = "QLORA_"
# What `hub_parts` may name, and the Hub's rule for a repository id (huggingface_hub's own validator, spelled out
# here because this module must not import it: the launcher has no huggingface_hub): `org/name`, each part 1-96
# characters of letters, digits, `_`, `-`, `.`, starting and ending with a letter, digit or `_`, no `--` or `..`,
# not ending in `.git`.
HUB_PARTS = ("adapter", "merged", "both")
_HUB_NAME = r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?"
HUB_REPO_ID = re.compile(rf"^{_HUB_NAME}/{_HUB_NAME}$")

# Secrets are never settings: they are read by the libraries from their standard variables (or files /
# Secrets Manager, see entrypoints.secrets), so they cannot end up in the parsed config, W&B or manifests.
SECRET_ENV_VARS = ("HF_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def _f(default: Any, doc: str, choices: Sequence[str] | None = None, group: str = "job") -> Any:
    return field(default=default, metadata={"doc": doc, "choices": tuple(choices or ()), "group": group})


@dataclass(frozen=True)
class JobConfig:
    """Every setting of the training job. Environment variable = `QLORA_` + NAME in upper case."""

    # --- inputs
    model: str = _f(
        "meta-llama/Llama-2-7b-hf",
        "Base model: a Hugging Face Hub id (uses HF_TOKEN), a local directory, or an s3:// prefix holding"
        " config.json, tokenizer and *.safetensors.",
        group="inputs",
    )
    model_revision: str = _f("main", "Hub revision (branch, tag or commit) when `model` is a Hub id.", group="inputs")
    model_name: str = _f(
        "",
        "How the outputs name the base model: adapter_config.json's base_model_name_or_path and the model card's"
        " base_model. Empty: `model` as given. Set it to the Hub id when `model` is a copy in S3 or a local directory,"
        " so the adapter loads by that name. The launcher sets it to the s3:// prefix when it passes `model` as a"
        " SageMaker input channel.",
        group="inputs",
    )
    data: str = _f(
        "",
        "Training data: an s3:// URI or local path of one file or a prefix/directory of them: .jsonl/.ndjson,"
        " .json (an array), .parquet, .csv/.tsv (header row), any case, the text ones optionally compressed"
        " (.gz, .bz2, .xz, .zst). In a prefix, hidden files, _SUCCESS and other `_` markers, *.crc, README* and"
        " LICENSE* are skipped (and logged); any other file type fails the job. Several sources, comma-separated"
        " (`s3://b/new/,s3://b/replay/`), are mixed: with `data_weights`, sampled in those proportions; without,"
        " every record of each. Defaults to the SageMaker `train` channel when running there.",
        group="inputs",
    )
    data_weights: str = _f(
        "",
        "With several `data` sources: one positive weight per source, comma-separated, in the same order"
        " (`0.7,0.3`; relative: `7,3` is the same): the share of the mixed training set drawn from each source,"
        " sampled by `seed`. Each source is shuffled and its records drawn without repeats until the mix ends"
        " (`data_mix_stopping`); a source the mix draws no record from fails the job (exit 3). Empty: no sampling,"
        " every record of every source once.",
        group="inputs",
    )
    data_mix_stopping: str = _f(
        "first_exhausted",
        "When a weighted mix ends: `first_exhausted` when the first source has given all its records (no record"
        " repeats; the larger sources are undersampled), `all_exhausted` when every source has given each of its"
        " records at least once (the smaller sources repeat; these repeats do not count against"
        " `max_duplicate_fraction`). The held-out records never repeat.",
        choices=("first_exhausted", "all_exhausted"),
        group="inputs",
    )
    data_format: str = _f(
        "auto",
        "Record format; `auto` detects it per file from the fields of its first record.",
        choices=("auto", "messages", "sharegpt", "alpaca", "dolly", "prompt_completion", "text"),
        group="inputs",
    )
    eval_data: str = _f(
        "",
        "Held-out eval data (same forms as `data`). Empty: split `eval_fraction` off the training data"
        " (or use the SageMaker `eval` channel when present).",
        group="inputs",
    )
    eval_fraction: float = _f(0.05, "Fraction of the training records held out for eval when `eval_data` is empty; 0 disables eval.", group="inputs")
    max_bad_records: int = _f(0, "How many malformed records may be skipped (and counted) before the job fails; 0 fails on the first.", group="inputs")
    max_truncated_fraction: float = _f(0.5, "The job fails (exit 3) before loading the model when a larger fraction of the training records is longer than max_seq_length (and would be cut); 1 never fails.", group="inputs")
    max_duplicate_fraction: float = _f(0.5, "The job fails (exit 3) before loading the model when a larger fraction of the training records repeats the prompt of an earlier record exactly (the repeats an `all_exhausted` mix draws on purpose aside); 1 never fails.", group="inputs")
    chat_template: str = _f(
        "auto",
        "`auto`: the tokenizer's own chat template, or the Llama 2 chat format for Llama tokenizers that have"
        " none; `tokenizer`: require the tokenizer's own; `llama-2`: force the Llama 2 chat format.",
        choices=("auto", "tokenizer", "llama-2"),
        group="inputs",
    )
    eval_suite: str = _f(
        "",
        "Comma-separated evaluation suites (s3:// URIs or local paths of JSON Lines files, one question a line:"
        " `prompt` or `messages`, a `reference` answer, optionally the `metric` that scores it). Each is answered by"
        " the base model and by the trained one, scored (exact_match, contains, token_f1, rouge_l, and `score`: the"
        " mean of each item's own metric, `contains` unless it names another), and reported in the manifest, the"
        " model card, W&B and the summary. A suite is named by its file name without the extension.",
        group="inputs",
    )
    s3_endpoint_url: str = _f("", "Endpoint of an S3-compatible store (MinIO, SeaweedFS, R2...); empty uses AWS (or AWS_ENDPOINT_URL_S3).", group="inputs")

    # --- outputs
    output: str = _f("", "Where the adapter, merged model, model card and manifest go (s3:// or a local directory). Default: <base_dir>/model.", group="outputs")
    output_exists: str = _f(
        "error",
        "What to do when `output` already holds a complete result (a manifest): `error` refuses, `overwrite`"
        " replaces it, `version` writes to a new `runs/<UTC time>-<random id>/` prefix below it.",
        choices=("error", "overwrite", "version"),
        group="outputs",
    )
    promote: str = _f(
        "auto",
        "With output_exists=version: whether this run becomes `latest.json`. `if-not-worse`: only when its"
        " promote_metric is not worse (within promote_tolerance) than that of the run latest.json names, measured on"
        " the same suite or eval set; otherwise the run is kept complete, not promoted, and the job exits 7."
        " `always`: every run that completes; `never`: none (a candidate run; exit 0). `auto`: if-not-worse when"
        " eval_suite or eval_data is set, always otherwise. The first run of a series is always promoted.",
        choices=("auto", "always", "if-not-worse", "never"),
        group="outputs",
    )
    promote_metric: str = _f(
        "auto",
        "What the promotion gate compares: `eval_loss` (lower is better) or `<suite>/<metric>` with metric one of"
        " exact_match, contains, token_f1, rouge_l, score (higher is better). `auto`: the first suite's score when"
        " eval_suite is set, else eval_loss.",
        group="outputs",
    )
    promote_tolerance: float = _f(0.0, "How much worse than the promoted run's promote_metric a run may be and still be promoted (in the metric's own units).", group="outputs")
    merge: bool = _f(True, "Also write the merged model: the adapter merged into the 16-bit base weights as the adapter saw them in training (the nf4/fp4 round trip; docs/MERGE.md), loadable without peft.", group="outputs")
    checkpoint_dir: str = _f("", "Local checkpoint directory; a rerun resumes from its newest complete checkpoint. Default: <base_dir>/checkpoints.", group="outputs")
    checkpoint_uri: str = _f("", "Optional s3:// prefix that checkpoints are mirrored to and restored from (Kubernetes; SageMaker syncs checkpoint_dir itself).", group="outputs")
    resume: bool = _f(True, "Resume from the newest complete checkpoint when one exists.", group="outputs")
    run_name: str = _f("", "Name of the run for W&B and the manifest; default: derived from the model name and time.", group="outputs")

    # --- model loading
    quantization: str = _f("nf4", "4-bit quantization of the frozen base weights (bitsandbytes); `none` trains plain LoRA on 16-bit weights.", choices=("nf4", "fp4", "none"), group="model")
    double_quant: bool = _f(True, "Quantize the 4-bit quantization constants too (saves ~0.4 bit per parameter).", group="model")
    compute_dtype: str = _f("auto", "Dtype of the 4-bit matmuls and LoRA weights; `auto`: bfloat16 where the GPU supports it, else float16; bfloat16 on CPU.", choices=("auto", "bfloat16", "float16", "float32"), group="model")
    attn_implementation: str = _f("sdpa", "Attention kernel passed to transformers.", choices=("sdpa", "eager", "flash_attention_2"), group="model")
    trust_remote_code: bool = _f(False, "Allow model code from the model repository to run. Off: only transformers' own architectures.", group="model")
    allow_pickle_weights: bool = _f(False, "Allow loading .bin/.pt (pickle) weights, which can run arbitrary code. Off: safetensors only.", group="model")

    # --- LoRA
    lora_r: int = _f(16, "LoRA rank.", group="lora")
    lora_alpha: int = _f(32, "LoRA scaling numerator (scale = lora_alpha / lora_r).", group="lora")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input. 0 (the default) spares every adapted module a dropped-out copy of its input (less memory, a little faster, the same loss on the benchmark: docs/PERF.md); 0.05-0.1 regularises small data sets trained for many epochs.", group="lora")
    lora_target_modules: str = _f("all-linear", "Comma-separated module names to adapt, or `all-linear` for every linear layer except the output head.", group="lora")

    # --- training
    max_seq_length: int = _f(2048, "Samples are truncated to this many tokens (and packed up to it when `packing` is on).", group="training")
    micro_batch_size: int = _f(4, "Samples per device per forward/backward pass without packing; with packing, micro_batch_size x gradient_accumulation_steps x the mean sample length sets the tokens per optimizer step.", group="training")
    micro_batch_tokens: int = _f(0, "Tokens per packed micro-batch (forward/backward pass); 0: as many as fit the GPU's memory, up to one optimizer step's tokens.", group="training")
    gradient_accumulation_steps: int = _f(4, "Micro-batches per optimizer step.", group="training")
    num_epochs: float = _f(1.0, "Passes over the training data (ignored when max_steps > 0).", group="training")
    max_steps: int = _f(-1, "Optimizer steps to run; -1 runs `num_epochs` epochs.", group="training")
    learning_rate: float = _f(2e-4, "Peak learning rate.", group="training")
    lr_scheduler: str = _f("cosine", "Learning-rate schedule after warm-up.", choices=("cosine", "linear", "constant", "constant_with_warmup"), group="training")
    warmup_ratio: float = _f(0.03, "Fraction of the steps spent warming the learning rate up.", group="training")
    weight_decay: float = _f(0.0, "AdamW weight decay.", group="training")
    max_grad_norm: float = _f(0.3, "Gradient clipping norm (0.3 as in the QLoRA paper).", group="training")
    optim: str = _f("auto", "Optimizer; `auto`: adamw_torch_fused on CUDA, adamw_torch on CPU, or bitsandbytes' adamw_8bit (8-bit moments) when the batch plan finds memory short even with activation offload.", choices=("auto", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch", "adamw_torch_fused", "adamw_8bit"), group="training")
    gradient_checkpointing: str = _f("auto", "Recompute activations in the backward pass to save memory. `auto`: on a GPU with packing, as many decoder layers as the GPU's memory allows keep their activations and the rest are recomputed; on CPU or without packing every layer is recomputed. `true`/`false` (or any boolean) force it.", choices=("auto", "true", "false"), group="training")
    max_gpu_memory_gib: float = _f(0.0, "Cap on the GPU memory the job may use, in GiB: the allocator is limited to it and the batch plan (micro-batch tokens, checkpointed layers) is fitted into it; for a shared GPU or a smaller card's budget. 0: the whole GPU.", group="training")
    activation_offload: str = _f("auto", "Offload the inputs of recomputed decoder layers to CPU memory during the forward pass (TRL's activation offloading, overlapped on a side stream), so larger packed micro-batches fit. `auto`: when the batch plan finds memory short (fewer tokens per micro-batch than one step's fit without it, or not even one row); with it every layer is recomputed. `true`: always, on CUDA with packing; `false`: never.", choices=("auto", "true", "false"), group="training")
    parallelism: str = _f("auto", "How several GPUs (torchrun processes) share the work. `ddp`: every GPU holds the whole 4-bit model and trains on its own micro-batches; `fsdp`: the 4-bit weights, LoRA weights and optimizer state are sharded across the GPUs (FSDP2), each GPU gathering one decoder layer at a time, for models that do not fit one GPU; `auto`: ddp when the model, its LoRA state and the smallest micro-batch fit one GPU (within max_gpu_memory_gib), else fsdp when the sharded estimate fits. One process: neither. FSDP needs CUDA GPUs.", choices=("auto", "ddp", "fsdp"), group="training")
    packing: bool = _f(True, "Pack whole samples into rows of max_seq_length (best-fit, padding-free, per-sample attention); off: each micro-batch is padded to its longest sample.", group="training")
    torch_compile: str = _f("auto", "Compile the decoder layers with torch.compile (regional: a layer whose activations are recomputed is compiled block by block) on CUDA, in place of Liger's kernels. `auto`: on CUDA where Triton can build its launcher (a C compiler; the image ships one), unless the batch plan recomputes some decoder layers and keeps others (Liger's kernels are used there); `true`: asked for (skipped with a warning where it cannot run); `false`: never. A part that fails to compile runs uncompiled, with one warning line.", choices=("auto", "true", "false"), group="training")
    compile_cache: str = _f("auto", "Keep torch.compile's compiled kernels (torch's portable compile cache) for the next start, so a resumed or rerun job skips most of the compilation. `auto`: written into every checkpoint (before it is marked complete, so it is mirrored and synced with it) and loaded when the run resumes from that checkpoint. An absolute directory or an s3:// prefix: also a store shared by runs (scheduled retraining on the same GPU type), loaded at start when it holds the artifact of this run's key (torch, Triton and CUDA versions, GPU, model config, compute dtype, LoRA, recomputed layers) and saved after the first optimizer steps and at the end of training; on SageMaker or Kubernetes a directory outlives the container only on a mounted volume (else use s3://, e.g. below the bucket's checkpoints/ prefix, which the job's role may write). `off`: neither. Used only when the job compiles (torch_compile); an unusable artifact is logged in one line and the job compiles from scratch.", group="training")
    use_liger: bool = _f(True, "Use Liger's fused RMSNorm, SwiGLU and RoPE kernels on CUDA (when liger-kernel is installed).", group="training")
    assistant_only_loss: bool = _f(True, "Train on assistant tokens only (prompts, system and user turns are masked out of the loss).", group="training")
    seed: int = _f(42, "Random seed for data order, LoRA init and dropout.", group="training")
    logging_steps: int = _f(10, "Log loss, learning rate and throughput every N optimizer steps.", group="training")
    eval_steps: int = _f(0, "Evaluate every N steps, and publish the adapter of the evaluation with the lowest eval loss (save_steps must be a multiple of N); 0: evaluate only before and after training and publish the last step's adapter.", group="training")
    early_stopping_patience: int = _f(0, "Stop training when the eval loss has not improved for this many evaluations in a row (needs eval_steps and eval data); 0: never stop early.", group="training")
    early_stopping_threshold: float = _f(0.0, "How much lower the eval loss must be than the best so far to count as an improvement for early stopping.", group="training")
    save_steps: int = _f(100, "Save a checkpoint every N optimizer steps.", group="training")
    save_total_limit: int = _f(2, "Checkpoints kept on local disk (oldest deleted first); 0 keeps all, 1 is refused.", group="training")
    num_sample_generations: int = _f(4, "Held-out prompts answered before and after training (logged and put in the model card); 0 disables.", group="training")
    max_new_tokens: int = _f(128, "Token budget of each answer generated for the held-out samples and the eval suites.", group="training")
    generation_batch_size: int = _f(0, "Prompts answered together in one batch when generating the held-out samples' and the eval suites' answers (greedy decoding). 0: as many as half of the free GPU memory holds, up to 128 (16 on CPU); a batch that runs out of GPU memory is split and retried. Sharded (FSDP) runs answer on every rank in step: the ranks use the smallest of their sizes, and a batch out of memory stops the job (exit 2, naming the size to set) since one rank cannot retry alone.", group="training")

    # --- tracking
    report_to: str = _f("auto", "Experiment tracking; `auto`: W&B when WANDB_API_KEY (from any secret source) or WANDB_MODE is set, else none.", choices=("auto", "wandb", "none"), group="tracking")
    wandb_project: str = _f("qlora-job", "W&B project.", group="tracking")
    wandb_entity: str = _f("", "W&B entity (team or user); empty: the key's default.", group="tracking")

    # --- Hugging Face Hub (optional)
    hub_repo: str = _f("", "Hugging Face Hub repository (`org/name`) the result is also published to, once the output is complete; empty: not published. Needs HF_TOKEN (from any secret source) with write access; a failed publish exits 9 and leaves the output as it is.", group="hub")
    hub_private: bool = _f(True, "Create the Hub repository private. An existing repository keeps its visibility, and a public one is refused while this is true.", group="hub")
    hub_parts: str = _f("adapter", "What goes to the Hub, with the model card as README.md: `adapter` (the adapter's files at the repository's root), `merged` (the merged model at the root), `both` (the merged model at the root, the adapter in adapter/).", choices=HUB_PARTS, group="hub")

    # --- secrets (references only: the values are resolved at run time and never stored in the config)
    secrets_arn: str = _f("", "ARN of a Secrets Manager secret (a JSON object with HF_TOKEN and/or WANDB_API_KEY) read at job start.", group="secrets")
    secrets_dir: str = _f("", "A mounted directory (e.g. a Kubernetes Secret volume) with files named HF_TOKEN and/or WANDB_API_KEY.", group="secrets")

    # --- runtime
    base_dir: str = _f(DEFAULT_BASE_DIR, "Base of the container layout (input/, model/, checkpoints/, output/failure).", group="runtime")
    log_level: str = _f("info", "Log verbosity.", choices=("debug", "info", "warning", "error"), group="runtime")
    distributed_timeout_seconds: int = _f(1800, "Several processes (GPUs or hosts): how long a process waits for the others in one of training's collectives (the gradient all-reduce, a barrier) before it gives them up as lost and the job stops with exit 10. A process that is killed or crashes closes its connections and is noticed at once; this bounds one whose machine or network vanished silently.", group="runtime")

    # ---------------------------------------------------------------- derived values
    @property
    def paths(self) -> ContainerPaths:
        return container_paths(self.base_dir)

    @property
    def output_uri(self) -> str:
        return self.output or str(self.paths.model_dir)

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else self.paths.checkpoint_dir

    @property
    def base_model_name(self) -> str:
        """The base model's name in the outputs: where it came from, never the scratch copy the job loaded."""
        return self.model_name or self.model

    @property
    def data_sources(self) -> list[str]:
        """The training data sources `data` names (one, or several to mix), in order."""
        return data_sources(self.data)

    @property
    def data_mix_weights(self) -> list[float] | None:
        """The mix's weights normalised to sum to 1, one per source; None without weights (or when invalid: parse_config
        refuses those)."""
        weights = parse_weights(self.data_weights)
        if not weights or any(isinstance(w, str) for w in weights) or len(weights) != len(self.data_sources):
            return None
        total = sum(weights)
        return [w / total for w in weights]

    @property
    def target_modules(self) -> str | list[str]:
        if self.lora_target_modules.strip() == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    @property
    def promote_policy(self) -> str:
        """QLORA_PROMOTE with `auto` decided: if-not-worse where a fixed yardstick exists (a suite, or eval data that
        does not move with the training data) and the output is versioned; always otherwise."""
        if self.promote != "auto":
            return self.promote
        fixed = bool(self.eval_suite.strip() or self.eval_data)
        return "if-not-worse" if fixed and self.output_exists == "version" else "always"

    @property
    def promote_on(self) -> str:
        """QLORA_PROMOTE_METRIC with `auto` decided: the first suite's score, else eval_loss."""
        from entrypoints.suites import suite_name, suite_uris

        if self.promote_metric != "auto":
            return self.promote_metric
        uris = suite_uris(self.eval_suite)
        return f"{suite_name(uris[0])}/score" if uris else "eval_loss"

    def to_public_dict(self) -> dict[str, Any]:
        """What goes to W&B and the manifest: every setting (none of them is a secret, by construction)."""
        return dataclasses.asdict(self)

    def source_of(self, name: str) -> str | None:
        """Where the setting `name` was given (its variable, flag or hyperparameters.json key), or None when it was
        not given and holds its default."""
        return getattr(self, "_sources", {}).get(name)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(JobConfig)}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def data_sources(setting: str) -> list[str]:
    """`s3://b/new/, s3://b/replay/` -> its items, stripped; an empty item stays (as "") for validate to name."""
    items = [part.strip() for part in setting.split(",")]
    return [] if items == [""] else items


def parse_weights(setting: str) -> list[float | str]:
    """The items of `data_weights`: each a float, or the text of an item that is not a positive finite number."""
    out: list[float | str] = []
    for item in (part.strip() for part in setting.split(",")) if setting.strip() else ():
        try:
            value = float(item)
        except ValueError:
            out.append(item)
            continue
        out.append(value if math.isfinite(value) and value > 0 else item)
    return out


def _data_mix_problems(cfg: JobConfig, where: Any) -> list[str]:
    """The data sources and their weights: every problem, naming the variable and the item."""
    p: list[str] = []
    sources = cfg.data_sources
    data, weights_name = where("data"), where("data_weights")
    if len(sources) > 1 or "" in sources:
        empty = [i for i, s in enumerate(sources, 1) if not s]
        if empty:
            p.append(f"{data}={cfg.data!r}: item {', '.join(map(str, empty))} of the comma-separated list is empty:"
                     " remove the extra comma")
        seen: dict[str, int] = {}
        for i, source in enumerate(sources, 1):
            # By location: `s3://b/new` and `s3://b/new/` (or `data` and `./data/`) name the same records.
            where_is = _location(source) if source else ""
            if source and where_is in seen:
                first = sources[seen[where_is] - 1]
                same = (f"{source!r} is listed twice" if first == source else
                        f"{first!r} and {source!r} name the same location")
                p.append(f"{data}: {same} (items {seen[where_is]} and {i}): give it once (with a larger weight in"
                         f" {env_name('data_weights')} to draw more from it)")
            seen.setdefault(where_is, i)
    if not cfg.data_weights.strip():
        return p
    weights = parse_weights(cfg.data_weights)
    bad = [f"{w!r}" for w in weights if isinstance(w, str)]
    if bad:
        p.append(f"{weights_name}={cfg.data_weights!r}: {', '.join(bad)} is not a positive number: give one weight"
                 " above 0 per source, e.g. 0.7,0.3")
    if len(sources) < 2:
        p.append(f"{weights_name}={cfg.data_weights!r}: weights mix several sources, and {data} names"
                 f" {'none' if not sources else 'one'}: list the sources comma-separated in {data} (s3://b/new/,"
                 f"s3://b/replay/), or leave {env_name('data_weights')} unset")
    elif len(weights) != len(sources):
        p.append(f"{weights_name}={cfg.data_weights!r} gives {len(weights)} weight(s) for the {len(sources)} sources"
                 f" of {data}: give one weight per source, in the same order")
    return p


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def cli_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _type_name(f: dataclasses.Field) -> str:
    return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}[_annotation(f)]


def _annotation(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else f.type.__name__


def _convert(f: dataclasses.Field, raw: Any) -> Any:
    """Convert one raw value (string from env/CLI, or JSON value) to the field's type, or raise ValueError."""
    kind = _annotation(f)
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError("expected a boolean: true/false (also 1/0, yes/no, on/off)")
    if kind == "int":
        if isinstance(raw, bool):
            raise ValueError("expected an integer")
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        try:
            return int(str(raw).strip())
        except ValueError:
            raise ValueError("expected an integer, e.g. 100") from None
    if kind == "float":
        if isinstance(raw, bool):
            raise ValueError("expected a number")
        try:
            value = float(str(raw).strip())
        except ValueError:
            raise ValueError("expected a number, e.g. 0.0002 or 2e-4") from None
        if not math.isfinite(value):
            raise ValueError("expected a finite number")
        return value
    choices = f.metadata["choices"]
    if set(choices) == {"auto", "true", "false"}:  # a boolean that also takes `auto`: any boolean spelling
        text = str(raw).strip().lower()
        if raw is True or text in _TRUE:
            return "true"
        if raw is False or text in _FALSE:
            return "false"
        if text == "auto":
            return "auto"
        raise ValueError("expected auto or a boolean: true/false (also 1/0, yes/no, on/off)")
    if f.name == "lora_target_modules" and isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        raw = ",".join(raw)  # hyperparameters.json may hold the list itself: ["q_proj", "v_proj"]
    value = raw if isinstance(raw, str) else json.dumps(raw) if isinstance(raw, (list, dict)) else str(raw)
    if choices and value not in choices:
        raise ValueError(f"expected one of {', '.join(choices)}")
    return value


def _unknown(key: str, where: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else "; see docs/SETTINGS.md or `python -m entrypoints.train --help`"
    return f"{where} is not a known setting{hint}"


def _load_hyperparameters(path: Path, problems: list[str]) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{path}: cannot be read as JSON ({exc}); fix or remove the file")
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a JSON object of setting -> value, got {type(data).__name__}")
        return {}
    return data


def _parse_cli(argv: Sequence[str], problems: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            problems.append(f"command line: unexpected argument {arg!r}; settings are given as --name value")
            i += 1
            continue
        key, eq, value = arg[2:].partition("=")
        name = key.replace("-", "_")
        if name not in FIELDS:
            hint = ""
            if name.startswith("no_") and name[3:] in FIELDS:
                hint = f" (write {cli_name(name[3:])} false)"
            problems.append(_unknown(cli_name(name), f"command line flag --{key}{hint}", [cli_name(n) for n in FIELDS]))
            # Its value, if it has one, is not a flag of its own.
            i += 1 if eq or i + 1 >= len(args) or args[i + 1].startswith("--") else 2
            continue
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                problems.append(f"command line: {arg} needs a value, e.g. {arg} {_example(FIELDS[name])}")
                i += 1
                continue
            value = args[i + 1]
            i += 1
        values[name] = value
        i += 1
    return values


def _example(f: dataclasses.Field) -> str:
    if f.metadata["choices"]:
        return f.metadata["choices"][0]
    return {"bool": "true", "int": "100", "float": "0.5"}.get(_annotation(f), "VALUE")


def help_text(command: str) -> str:
    """The usage of the job: how settings are given, then every setting with its type, default and doc."""
    import textwrap

    lines = [f"usage: {command} [--name value ...]", "",
             "Fine-tunes a Llama-class (decoder-only) or T5-class (encoder-decoder) model with QLoRA. Every setting",
             "can be given as an environment variable (QLORA_NAME), a flag (--name value or --name=value) or a key",
             "of SageMaker's hyperparameters.json; precedence: defaults < hyperparameters.json < environment <",
             "flags. Secrets (HF_TOKEN, WANDB_API_KEY) are never settings: they come from the environment,",
             "QLORA_SECRETS_DIR or QLORA_SECRETS_ARN. Settings that do not apply to encoder-decoder models (packing,",
             "chat_template, use_liger...) are ignored when not given and refused when given.",
             "Exit codes: 0 ok, 1 internal, 2 configuration, 3 data, 4 model, 5 storage or network (a rerun may",
             "help), 6 output exists, 7 complete but not promoted (latest.json unchanged),",
             "9 outputs complete but the Hub publish failed (retry it alone: python -m entrypoints.hub),",
             "75 preempted (rerun to resume).", "", "settings:"]
    for group in dict.fromkeys(f.metadata["group"] for f in FIELDS.values()):
        lines.append(f"  [{group}]")
        for f in (f for f in FIELDS.values() if f.metadata["group"] == group):
            default = "(empty)" if f.default == "" else str(f.default).lower() if isinstance(f.default, bool) else f.default
            choices = f" {{{','.join(f.metadata['choices'])}}}" if f.metadata["choices"] else ""
            lines.append(f"  {cli_name(f.name)} / {env_name(f.name)}  ({_type_name(f)}{choices}, default {default})")
            lines += textwrap.wrap(f.metadata["doc"], width=100, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def parse_config(
    env: Mapping[str, str],
    argv: Sequence[str] = (),
    *,
    check_paths: bool = True,
    require_data: bool = True,
) -> JobConfig:
    """Build the job's configuration from hyperparameters.json, the environment and the CLI.

    Raises ConfigError listing every problem found. `check_paths=False` skips checks of local paths
    (the launcher validates a job that will run elsewhere); `require_data=False` accepts a configuration without
    training data (to show the settings before there is any).
    """
    problems: list[str] = []
    raw: dict[str, tuple[Any, str]] = {}  # name -> (raw value, where it came from)

    env_values: dict[str, str] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name in FIELDS:
            env_values[name] = value
        else:
            problems.append(_unknown(key, f"environment variable {key}", [env_name(n) for n in FIELDS]))
    cli_values = _parse_cli(argv, problems)

    # The base dir decides where hyperparameters.json is, so it is resolved from env/CLI first.
    base_dir = cli_values.get("base_dir") or env_values.get("base_dir") or DEFAULT_BASE_DIR
    paths = container_paths(base_dir)
    hp_file = paths.hyperparameters_file
    for key, value in _load_hyperparameters(hp_file, problems).items():
        if key.startswith("sagemaker_"):  # the SDK's own bookkeeping keys
            continue
        if key in FIELDS:
            raw[key] = (value, f"{hp_file} key {key!r}")
        else:
            problems.append(_unknown(key, f"{hp_file} key {key!r}", list(FIELDS)))
    for name, value in env_values.items():
        raw[name] = (value, f"{env_name(name)}")
    for name, value in cli_values.items():
        raw[name] = (value, f"{cli_name(name)}")

    values: dict[str, Any] = {}
    for name, (value, where) in raw.items():
        if value is None:  # JSON null: neither a value nor "unset"
            problems.append(f"{where} is null: give a value, or remove the key to use the default")
            continue
        try:
            values[name] = _convert(FIELDS[name], value)
        except ValueError as exc:
            problems.append(f"{where}={value!r}: {exc}")

    # SageMaker input channels fill in what was not set explicitly.
    channel_env = {"data": ("SM_CHANNEL_TRAIN", "train"), "eval_data": ("SM_CHANNEL_EVAL", "eval"), "model": ("SM_CHANNEL_MODEL", "model")}
    for name, (var, channel) in channel_env.items():
        if name in raw:
            continue
        if env.get(var):
            values[name] = env[var]
        elif check_paths and paths.channel_dir(channel).is_dir():
            values[name] = str(paths.channel_dir(channel))

    cfg_values = {n: values[n] for n in FIELDS if n in values}
    try:
        cfg = JobConfig(**cfg_values)
    except TypeError as exc:  # pragma: no cover - every key was checked above
        raise ConfigError([str(exc)]) from None
    sources = {name: where for name, (_, where) in raw.items()}
    problems.extend(validate(cfg, check_paths=check_paths, sources=sources, require_data=require_data))
    if problems:
        raise ConfigError(problems)
    # Where each value came from is not a setting (not in the table, the manifest or the fingerprint), but a setting
    # that only the model's architecture makes inapplicable is refused when given and ignored when not
    # (seq2seq_config), so the instance keeps it beside its fields.
    object.__setattr__(cfg, "_sources", sources)
    return cfg


def validate(cfg: JobConfig, *, check_paths: bool = True, sources: Mapping[str, str] | None = None,
             require_data: bool = True) -> list[str]:
    """Cross-field checks. Returns every problem found, each naming the variable and the fix."""
    p: list[str] = []

    def bad(name: str, why: str) -> None:
        # Named where the value came from: the variable, the flag or the hyperparameters.json key.
        p.append(f"{(sources or {}).get(name, env_name(name))}={getattr(cfg, name)!r}: {why}")

    if not cfg.data and require_data:
        p.append(DATA_NOT_SET)
    def where(name: str) -> str:
        return (sources or {}).get(name, env_name(name))

    for name in ("model", "data", "eval_data", "output", "checkpoint_uri"):
        for value in cfg.data_sources if name == "data" else [getattr(cfg, name)]:
            shown = "" if name != "data" or len(cfg.data_sources) == 1 else f" (the source {value!r})"
            if value.startswith("s3://") and len(value) <= len("s3://"):
                bad(name, f"an s3:// URI needs a bucket, e.g. s3://my-bucket/prefix{shown}")
            elif "://" in value and not value.startswith("s3://"):
                bad(name, f"only s3:// URIs and local paths are supported{shown}")
    p.extend(_data_mix_problems(cfg, where))
    if cfg.checkpoint_uri and not cfg.checkpoint_uri.startswith("s3://"):
        bad("checkpoint_uri", "must be an s3:// prefix (or empty)")
    if not cfg.model:
        bad("model", "must name a Hub id, a local directory or an s3:// prefix")
    if check_paths:
        # A comma in a local path: the whole value exists, its pieces do not (they would be named as missing).
        comma = len(cfg.data_sources) > 1 and not cfg.data.startswith("s3://") and Path(cfg.data).exists()
        if comma:
            bad("data", "a comma separates the sources of a mix, and this path holds one: rename the file or"
                " directory without the comma")
        for name in ("eval_data",) if comma else ("data", "eval_data"):
            for value in cfg.data_sources if name == "data" else [getattr(cfg, name)]:
                if value and not value.startswith("s3://") and not Path(value).exists():
                    bad(name, "no such file or directory" + (f": {value}" if value != getattr(cfg, name) else ""))
    for name in ("max_truncated_fraction", "max_duplicate_fraction"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            bad(name, "must be a fraction between 0 and 1 (1: never fail)")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        bad("eval_fraction", "must be at least 0 and below 1 (0.05 holds out 5%)")
    if cfg.eval_data and cfg.eval_fraction not in (0.0, FIELDS["eval_fraction"].default):
        p.append(f"{env_name('eval_data')} and {env_name('eval_fraction')} are both set: use one of them")
    if cfg.save_total_limit == 1:
        bad("save_total_limit", "must be 0 (keep all) or at least 2: with 1, the old checkpoint is deleted before"
            " the new one is complete, so a kill in between leaves nothing to resume from")
    for name in ("max_bad_records", "num_sample_generations", "save_total_limit", "eval_steps", "micro_batch_tokens"):
        if getattr(cfg, name) < 0:
            bad(name, "must be 0 or more")
    for name in ("lora_r", "lora_alpha", "max_seq_length", "micro_batch_size", "gradient_accumulation_steps",
                 "logging_steps", "save_steps", "max_new_tokens", "distributed_timeout_seconds"):
        if getattr(cfg, name) < 1:
            bad(name, "must be 1 or more")
    if cfg.max_seq_length > 131072:
        bad("max_seq_length", "is larger than any Llama-class context (131072)")
    if not 0 <= cfg.seed < 2**32:
        bad("seed", "must be between 0 and 4294967295 (the random generators' range)")
    if isinstance(cfg.target_modules, list) and "lm_head" in cfg.target_modules:
        bad("lora_target_modules", "the output head (lm_head) cannot be adapted here (TRL refuses it): name the"
            " blocks' linear layers, e.g. q_proj,k_proj,v_proj,o_proj, or all-linear")
    if cfg.activation_offload == "true" and cfg.gradient_checkpointing == "false":
        bad("activation_offload", "offloads the inputs of recomputed layers, and gradient_checkpointing=false"
            " recomputes none: set gradient_checkpointing to auto or true, or activation_offload to auto")
    if cfg.activation_offload == "true" and not cfg.packing:
        bad("activation_offload", "is part of the packed batch plan, and packing is off: set packing=true, or"
            " activation_offload to auto")
    problem = compile_cache_problem(cfg.compile_cache)
    if problem:
        bad("compile_cache", problem)
    if cfg.max_gpu_memory_gib < 0:
        bad("max_gpu_memory_gib", "must be 0 (the whole GPU) or a number of GiB, e.g. 22 for a 24 GB card")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        bad("lora_dropout", "must be at least 0 and below 1")
    if not cfg.target_modules:
        bad("lora_target_modules", "name at least one module, e.g. q_proj,v_proj, or all-linear")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        bad("max_steps", "must be a positive number of steps, or -1 to train for num_epochs")
    if cfg.max_steps == -1 and cfg.num_epochs <= 0:
        bad("num_epochs", "must be above 0 when max_steps is -1")
    if not 0.0 < cfg.learning_rate < 1.0:
        bad("learning_rate", "must be above 0 and below 1 (2e-4 is typical for QLoRA)")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        bad("warmup_ratio", "must be at least 0 and below 1")
    if cfg.weight_decay < 0:
        bad("weight_decay", "must be 0 or more")
    if cfg.max_grad_norm < 0:
        bad("max_grad_norm", "must be 0 or more (0 disables clipping)")
    if not cfg.base_dir:
        bad("base_dir", "must be a directory path")
    if cfg.hub_repo:
        problem = hub_repo_problem(cfg.hub_repo)
        if problem:
            bad("hub_repo", problem)
        if cfg.hub_parts in ("merged", "both") and not cfg.merge:
            bad("hub_parts", f"needs the merged model, which {env_name('merge')}=false does not write: publish"
                f" `adapter`, or set {env_name('merge')}=true")
    p.extend(_overlaps(cfg, check_paths))
    p.extend(_evaluation_problems(cfg, check_paths, bad))
    return p


def _evaluation_problems(cfg: JobConfig, check_paths: bool, bad: Any) -> list[str]:
    """Eval suites, early stopping and the promotion gate: what each needs to mean anything."""
    from entrypoints.suites import SUMMARY_METRICS, check_suite_setting, suite_name, suite_uris

    p = check_suite_setting(cfg.eval_suite)
    for uri in suite_uris(cfg.eval_suite):
        if "://" in uri and not uri.startswith("s3://"):
            p.append(f"{env_name('eval_suite')}: {uri!r}: only s3:// URIs and local paths are supported")
        elif check_paths and not uri.startswith("s3://") and not Path(uri).is_file():
            p.append(f"{env_name('eval_suite')}: {uri!r}: no such file")
    may_eval = bool(cfg.eval_data) or cfg.eval_fraction > 0
    if cfg.generation_batch_size < 0:
        bad("generation_batch_size", "must be 0 (as many as fit) or more")
    if cfg.early_stopping_patience < 0:
        bad("early_stopping_patience", "must be 0 (never stop early) or more")
    if cfg.early_stopping_threshold < 0:
        bad("early_stopping_threshold", "must be 0 or more (an improvement of the eval loss)")
    if cfg.early_stopping_patience > 0 and (not cfg.eval_steps or not may_eval):
        bad("early_stopping_patience", f"needs {env_name('eval_steps')} (how often the eval loss is measured) and eval"
            f" data ({env_name('eval_data')}, or {env_name('eval_fraction')} above 0)")
    if cfg.eval_steps > 0 and cfg.save_steps % cfg.eval_steps:
        p.append(f"{env_name('save_steps')}={cfg.save_steps} is not a multiple of {env_name('eval_steps')}="
                 f"{cfg.eval_steps}: the adapter of the best evaluation is published, so every evaluation's step must"
                 " be saveable; make save_steps a multiple of eval_steps")
    if cfg.promote in ("if-not-worse", "never") and cfg.output_exists != "version":
        bad("promote", f"the gate moves `latest.json` of a versioned output: set {env_name('output_exists')}=version"
            " (each run in its own runs/<id>/), or leave QLORA_PROMOTE unset")
    if cfg.promote_tolerance < 0:
        bad("promote_tolerance", "must be 0 or more (how much worse a promoted run may be)")
    metric = cfg.promote_metric
    names = [suite_name(u) for u in suite_uris(cfg.eval_suite)]
    if metric not in ("auto", "eval_loss"):
        suite, _, name = metric.partition("/")
        if suite not in names or name not in SUMMARY_METRICS:
            known = ", ".join(f"{n}/{m}" for n in names[:2] for m in SUMMARY_METRICS[-2:])
            bad("promote_metric", "expected eval_loss or <suite>/<metric> with a suite of"
                f" {env_name('eval_suite')} ({', '.join(names) or 'none is set'}) and a metric of"
                f" {', '.join(SUMMARY_METRICS)}" + (f", e.g. {known}" if known else ""))
    elif cfg.promote_policy == "if-not-worse" and cfg.promote_on == "eval_loss" and not may_eval:
        p.append(f"the promotion gate compares eval_loss, and this run has no eval data: set {env_name('eval_data')},"
                 f" or {env_name('eval_suite')} and {env_name('promote_metric')}=<suite>/<metric>, or"
                 f" {env_name('promote')}=always")
    return p


# Settings that do not apply to an encoder-decoder (seq2seq) model: the values its training works with (a given
# value outside them is refused; an unset one is ignored, and set to the first of them where the field allows)
# and why. The job trains a T5-class model on (input text, target text) pairs with transformers' Seq2SeqTrainer.
SEQ2SEQ_SETTINGS: dict[str, tuple[tuple[Any, ...], str]] = {
    "packing": ((False,), "an encoder-decoder model is trained on padded (input, target) pairs, nothing is packed"),
    "micro_batch_tokens": ((0,), "it sizes packed micro-batches, and nothing is packed"),
    "assistant_only_loss": ((True,), "the loss is on the target (the last answer) only; the prompt is the encoder's"
                            " input"),
    "chat_template": ((), "the prompt turns are rendered as plain `role: text` lines, not with a chat template"),
    "data_format": (("auto", "messages", "sharegpt", "alpaca", "dolly", "prompt_completion"),
                    "plain `text` records have no prompt and answer to train an encoder-decoder model on"),
    "use_liger": ((False,), "Liger's kernels are written for Llama-class decoders"),
    "torch_compile": (("false",), "the job compiles the decoder layers of Llama-class models only"),
    "activation_offload": (("auto", "false"), "the job offloads activations in the packed plan of Llama-class"
                           " decoders only"),
    "compute_dtype": (("auto", "bfloat16", "float32"), "T5-class models overflow in float16 (use bfloat16 or"
                      " float32)"),
    "attn_implementation": (("sdpa", "eager"), "T5-class models have no flash-attention implementation"),
    "parallelism": (("auto", "ddp"), "the job shards Llama-class decoders only (T5-class models train with ddp)"),
}


def seq2seq_config(cfg: JobConfig) -> tuple[JobConfig, list[str]]:
    """The settings an encoder-decoder model trains with, and the names of the settings of SEQ2SEQ_SETTINGS that were
    not given and whose defaults do not apply (those a value applies to are set to it). Raises ConfigError naming
    each given setting whose value asks for what seq2seq training does not do."""
    problems, ignored, changes = [], [], {}
    for name, (works_with, why) in SEQ2SEQ_SETTINGS.items():
        value = getattr(cfg, name)
        if value in works_with:
            continue
        source = cfg.source_of(name)
        if source is not None:
            fix = (f"remove it, or set it to {' or '.join(_shown(v) for v in works_with)}" if works_with else
                   "remove it")
            problems.append(f"{source}={_shown(value)} is not for encoder-decoder (T5-class) models: {why}; {fix}")
            continue
        ignored.append(name)
        if works_with:
            changes[name] = works_with[0]
    if problems:
        raise ConfigError(problems)
    effective = dataclasses.replace(cfg, **changes)
    object.__setattr__(effective, "_sources", getattr(cfg, "_sources", {}))
    return effective, ignored


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def compile_cache_problem(value: str) -> str | None:
    """Why `value` is not a compile_cache setting (None when it is one): auto, off, an absolute directory or an s3://
    prefix with a bucket."""
    if value in ("auto", "off") or (value.startswith("/") and value.strip() == value):
        return None
    if value.startswith("s3://"):
        return None if value[len("s3://"):].split("/")[0] else "an s3:// prefix needs a bucket, e.g. s3://my-bucket/checkpoints/compile-cache/"
    return ("expected auto, off, an absolute directory (e.g. /mnt/cache/torch-compile) or an s3:// prefix (e.g."
            " s3://my-bucket/checkpoints/compile-cache/)")


def compile_cache_store(value: str) -> str | None:
    """The shared store a compile_cache setting names (a directory or an s3:// prefix), None for auto and off."""
    return None if value in ("auto", "off") else value


def hub_repo_problem(repo: str) -> str | None:
    """Why `repo` is not a Hub repository id the job can create and publish to, or None when it is one."""
    if not HUB_REPO_ID.match(repo) or "--" in repo or ".." in repo or repo.endswith(".git"):
        return ("is not a Hub repository id: write `org/name` (letters, digits, `_`, `-`, `.`; each part at most 96"
                " characters, starting and ending with a letter, digit or `_`; no `--`, `..` or trailing `.git`)")
    return None


DATA_NOT_SET = (f"{env_name('data')} is not set: give the training data as an s3:// URI or a local path"
                " (or run on SageMaker with a `train` input channel)")


def _location(value: str) -> str:
    """A comparable form of an s3:// URI or a local path (absolute, normalised, with a trailing slash)."""
    if value.startswith("s3://"):
        return value.rstrip("/") + "/"
    return os.path.normpath(os.path.abspath(os.path.expanduser(value))).rstrip("/") + "/"


def _overlaps(cfg: JobConfig, check_paths: bool = True) -> list[str]:
    """Locations that must not lie inside one another: the outputs would be read back as training data by the next
    run, overwrite the base model, be mixed with checkpoints, or be wiped with the job's scratch space."""
    places = {"output": [cfg.output_uri], "data": [d for d in cfg.data_sources if d], "eval_data": [cfg.eval_data],
              "checkpoint_dir": [str(cfg.checkpoint_path)], "checkpoint_uri": [cfg.checkpoint_uri],
              "base_dir (its work/ scratch)": [str(cfg.paths.work_dir)]}
    if cfg.model.startswith("s3://") or cfg.model.startswith(("/", ".", "~")) or (check_paths and Path(cfg.model).exists()):
        places["model"] = [cfg.model]  # a local directory, however it is written (modeling.resolve_model's rule)
    places["compile_cache"] = [compile_cache_store(cfg.compile_cache) or ""]
    located = {name: [(v, _location(v)) for v in values if v] for name, values in places.items()}
    rules = [("eval_data", "data", "the eval loss and answers would be measured on training data, not held out"),
             ("output", "data", "the next run would read the outputs as training data"),
             ("output", "eval_data", "the next run would read the outputs as eval data"),
             ("output", "model", "it would write into the base model"),
             ("checkpoint_dir", "data", "checkpoints would be read as training data"),
             ("checkpoint_uri", "data", "checkpoints would be read as training data"),
             ("output", "checkpoint_dir", "outputs and checkpoints would be mixed"),
             ("output", "checkpoint_uri", "outputs and checkpoints would be mixed"),
             ("output", "base_dir (its work/ scratch)", "the job clears its scratch space, the outputs with it"),
             ("compile_cache", "data", "the compile cache's files would be read as training data"),
             ("compile_cache", "eval_data", "the compile cache's files would be read as eval data"),
             ("compile_cache", "output", "the compile cache's files would be mixed with the published outputs"),
             ("compile_cache", "model", "the compile cache's files would be written into the base model")]
    problems = []
    label = lambda n: "QLORA_BASE_DIR" if n.startswith("base_dir") else env_name(n)  # noqa: E731
    for inner, outer, why in rules:
        for (shown_a, a), (shown_b, b) in ((x, y) for x in located.get(inner, []) for y in located.get(outer, [])):
            if a.startswith(b) or b.startswith(a):
                problems.append(f"{label(inner)}={shown_a!r} and {label(outer)}={shown_b!r} overlap (one lies inside"
                                f" the other): {why}. Give them separate locations")
    data = located["data"]
    for i, (shown_a, a) in enumerate(data):
        for shown_b, b in data[i + 1:]:
            if a != b and (a.startswith(b) or b.startswith(a)):
                problems.append(f"{label('data')}: the sources {shown_a!r} and {shown_b!r} overlap (one lies inside the"
                                " other): the records of the inner one would be read twice. Give separate prefixes")
    return problems


def markdown_table() -> str:
    """The table of variables in docs/SETTINGS.md, generated from the dataclass (a test checks they agree)."""
    rows = ["| variable | type | default | description |", "| --- | --- | --- | --- |"]
    for f in FIELDS.values():
        default = f.default
        shown = "(empty)" if default == "" else str(default).lower() if isinstance(default, bool) else str(default)
        doc = f.metadata["doc"]
        if f.metadata["choices"]:
            doc += " One of: " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + "."
        rows.append(f"| `{env_name(f.name)}` | {_type_name(f)} | `{shown}` | {doc.replace('|', '/')} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    import os

    ap = argparse.ArgumentParser(prog="python -m entrypoints.config", description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true", help="print the table of variables (docs/SETTINGS.md)")
    ap.add_argument("--check", action="store_true",
                    help="parse the environment (and --name value flags) as the job does and print the settings as"
                         " JSON; exit 2 with every problem, or when QLORA_DATA is not set (the settings are printed"
                         " then too)")
    args, rest = ap.parse_known_args(argv)
    if args.markdown:
        print(markdown_table())
        return 0
    try:
        cfg = parse_config(os.environ, rest)
    except ConfigError as exc:
        if exc.problems != [DATA_NOT_SET]:
            print(f"configuration error: {exc}", file=sys.stderr)
            return exc.exit_code
        # Only the data is missing: the settings are worth seeing before there is any, and the one gap is named.
        print(json.dumps(parse_config(os.environ, rest, require_data=False).to_public_dict(), indent=2))
        print(f"configuration error: {DATA_NOT_SET}. The settings above are what the job would use with it;"
              " every setting is described by `python -m entrypoints.train --help`", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(cfg.to_public_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
