"""Finding and loading the base model: Hub id, local directory or s3:// prefix -> local files -> 4-bit model."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from entrypoints import perf, storage
from entrypoints.config import JobConfig
from entrypoints.errors import ModelError

log = logging.getLogger("qlora.model")

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a training run needs from a model repository: no pickles, no GGUF/ONNX copies, no other formats.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt", "*.tiktoken"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def resolve_model(cfg: JobConfig, work_dir: Path, hf_token: str | None) -> Path:
    """Return a local directory holding the base model's config, tokenizer and weights."""
    source = cfg.model
    if storage.is_s3(source):
        local = storage.fetch(source.rstrip("/") + "/", work_dir / "base-model", endpoint_url=cfg.s3_endpoint_url)
    elif Path(source).exists():
        local = Path(source)
    elif HUB_ID.match(source):
        local = _from_hub(source, cfg.model_revision, work_dir / "hf-cache", hf_token)
    else:
        raise ModelError(f"QLORA_MODEL={source!r} is not a local directory, an s3:// prefix or a Hub id like"
                         " meta-llama/Llama-2-7b-hf")
    check_model_dir(local, cfg.allow_pickle_weights)
    return local


def _from_hub(repo_id: str, revision: str, cache_dir: Path, token: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    log.info("downloading %s@%s from the Hugging Face Hub", repo_id, revision)
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache_dir), token=token or None,
                                      allow_patterns=HUB_PATTERNS))
    except GatedRepoError:
        raise ModelError(f"{repo_id} is gated: accept its license on the Hub with your account and pass that"
                         " account's token as HF_TOKEN (or via QLORA_SECRETS_ARN / QLORA_SECRETS_DIR)") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{repo_id} was not found on the Hub (or is private and HF_TOKEN lacks access)") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelError(f"could not download {repo_id} from the Hub: {exc}. Without Hub access, put the model in"
                         " S3 or a local directory and point QLORA_MODEL there") from None


def check_model_dir(path: Path, allow_pickle: bool) -> None:
    if not path.is_dir():
        raise ModelError(f"{path}: the base model must be a directory with config.json, tokenizer files and weights")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: config.json is missing; point QLORA_MODEL at the model's root directory")
    safetensors = list(path.glob("*.safetensors"))
    pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not safetensors and not pickles:
        raise ModelError(f"{path}: no weight files (*.safetensors) found")
    if not safetensors and not allow_pickle:
        raise ModelError(f"{path}: only pickle weights ({', '.join(p.name for p in pickles[:3])}) were found; pickle"
                         " files can run arbitrary code when loaded. Convert them to safetensors, or set"
                         " QLORA_ALLOW_PICKLE_WEIGHTS=true if you trust their source")
    if not safetensors:
        log.warning("loading PICKLE weights from %s because QLORA_ALLOW_PICKLE_WEIGHTS=true", path)


def device_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(cfg: JobConfig):
    import torch

    if cfg.compute_dtype != "auto":
        return getattr(torch, cfg.compute_dtype)
    if device_kind() == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # On CPU, bitsandbytes' bf16 dequantization path is several times faster than its float32 one
    # (measured on this project's 2-core CI machines: one SmolLM2 step 20-25 s vs 75-100 s, shared CPU).
    return torch.bfloat16


def load_tokenizer(model_dir: Path, cfg: JobConfig):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_dir}: the tokenizer cannot be loaded ({exc}); the model directory needs"
                         " tokenizer.json or tokenizer.model with tokenizer_config.json") from None


def quantization_config(cfg: JobConfig) -> Any:
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "none":
        return None
    dtype = compute_dtype(cfg)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quantization,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=dtype,
        # Storing the packed 4-bit weights in the compute dtype lets FSDP shard them like any other tensor.
        bnb_4bit_quant_storage=dtype,
    )


def load_model(model_dir: Path, cfg: JobConfig, local_rank: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    device = device_kind()
    dtype = compute_dtype(cfg)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": cfg.attn_implementation,
        "trust_remote_code": cfg.trust_remote_code,
        "quantization_config": quantization_config(cfg),
        "device_map": {"": local_rank} if device == "cuda" else {"": "cpu"},
    }
    if not cfg.allow_pickle_weights:
        kwargs["use_safetensors"] = True
    if device == "cuda" and cfg.max_gpu_memory_gib:
        cap_gpu_memory(cfg.max_gpu_memory_gib, local_rank)
    log.info("loading %s (%s, compute %s) on %s", model_dir, cfg.quantization, str(dtype).removeprefix("torch."), device)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{model_dir}: the model cannot be loaded ({type(exc).__name__}: {exc})") from None
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    changed = perf.patch_model(model, cfg, device == "cuda")  # varlen attention for packed rows
    if changed:
        log.info("fast path: %s", changed)
    if device == "cuda":
        torch.cuda.empty_cache()
    else:
        keep_cpu_weights_trainable(model)
    return model


def cap_gpu_memory(gib: float, device_index: int = 0) -> float:
    """Limit this process's CUDA allocator to `gib` GiB (the batch plan reads the same limit); returns the fraction."""
    import torch

    total = torch.cuda.get_device_properties(device_index).total_memory
    fraction = gib * perf.GIB / total
    if fraction >= 1.0:
        log.warning("max_gpu_memory_gib=%s is not below this GPU's %.1f GiB: the whole GPU is used", gib,
                    total / perf.GIB)
        return 1.0
    torch.cuda.set_per_process_memory_fraction(fraction, device_index)
    log.info("GPU memory capped at %.1f of %.1f GiB (max_gpu_memory_gib)", gib, total / perf.GIB)
    return fraction


def keep_cpu_weights_trainable(model: Any) -> None:
    """Stop bitsandbytes (0.50) from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, a Linear4bit forward in eval mode without grad repacks the weight in place
    for `gemv_4bit`, which has no autograd kernel: every later training step then silently drops the
    gradient through the frozen layers (PyTorch warns "an autograd kernel was not registered"). Our eval
    before training would trigger exactly that, so the repacking is switched off.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
