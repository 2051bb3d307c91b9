"""Finding and loading the base model: Hub id, local directory or s3:// prefix -> local files -> 4-bit model.

Two kinds of model are trained: decoder-only causal LMs (Llama-class) and T5-class encoder-decoders (t5, mt5, umt5:
`is_seq2seq`), loaded with AutoModelForCausalLM and AutoModelForSeq2SeqLM respectively.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import re
import struct
from pathlib import Path
from typing import Any

from entrypoints import bnb4bit, perf, sizing, storage
from entrypoints.config import JobConfig, env_name
from entrypoints.errors import ConfigError, ModelError, StorageError

log = logging.getLogger("qlora.model")

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a training run needs from a model repository: no pickles, no GGUF/ONNX copies, no other formats.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt", "*.tiktoken"]
TOKENIZER_PATTERNS = [p for p in HUB_PATTERNS if p != "*.safetensors"]  # what rendering data needs: no weights
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def resolve_model(cfg: JobConfig, work_dir: Path, hf_token: str | None) -> Path:
    """Return a local directory holding the base model's config, tokenizer and weights."""
    source = cfg.model
    if storage.is_s3(source):
        local = storage.fetch(source.rstrip("/") + "/", work_dir / "base-model", endpoint_url=cfg.s3_endpoint_url)
    elif Path(source).exists():
        local = Path(source)
    elif HUB_ID.match(source):
        local = _from_hub_id(source, cfg.model_revision, hf_token, HUB_PATTERNS)
    else:
        raise ModelError(f"QLORA_MODEL={source!r} is not a local directory, an s3:// prefix or a Hub id like"
                         " meta-llama/Llama-2-7b-hf")
    check_model_dir(local, cfg.allow_pickle_weights)
    return local


def fetch_tokenizer(source: str, revision: str, dest: Path, endpoint_url: str, hf_token: str | None = None) -> Path:
    """A local directory with the tokenizer and config files of the model `source` (the forms of QLORA_MODEL),
    without downloading its weights: a local directory is used as it is."""
    if storage.is_s3(source):
        prefix = source.rstrip("/") + "/"
        objects = [o for o in storage.list_objects(prefix, endpoint_url=endpoint_url)
                   if "/" not in o.relative and any(fnmatch.fnmatch(o.relative, p) for p in TOKENIZER_PATTERNS)]
        if not objects:
            raise ModelError(f"{source}: no tokenizer or config files under this prefix; give the model's prefix")
        for obj in objects:
            storage.download_file(obj.uri, dest / obj.relative, size=obj.size, endpoint_url=endpoint_url)
        return dest
    if Path(source).exists():
        return Path(source)
    if HUB_ID.match(source):
        return _from_hub_id(source, revision, hf_token, TOKENIZER_PATTERNS)
    raise ModelError(f"{source!r} is not a local directory, an s3:// prefix or a Hub id like meta-llama/Llama-2-7b-hf")


def _from_hub_id(source: str, revision: str, token: str | None, patterns: list[str]) -> Path:
    """`source` names no local path and has the form of a Hub id: a failure says both, so that a mistyped local path
    (`models/llama` is a valid Hub id too) is not read as a Hub problem only."""
    try:
        return from_hub(source, revision, token, patterns)
    except (ModelError, StorageError) as exc:
        raise type(exc)(f"{source} is not a local path, so it was looked up as a Hub id: {exc}") from None


def from_hub(repo_id: str, revision: str, token: str | None, patterns: list[str]) -> Path:
    """Download the files of `repo_id` matching `patterns` into the Hugging Face cache and return their directory.

    The cache is huggingface_hub's own (HF_HOME, HF_HUB_CACHE): the image sets HF_HOME below /opt/ml/work, and a
    volume mounted there keeps the files for the next run, which then downloads nothing. A failure is a storage
    error (exit 5, worth a retry) when the Hub could not be reached or answered with a server-side error, and a
    model error (exit 4) when it answered that the model is missing, gated or not readable with this token.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    log.info("downloading %s@%s from the Hugging Face Hub (cache: %s)", repo_id, revision, constants.HF_HUB_CACHE)
    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token or None, allow_patterns=patterns))
    except GatedRepoError:
        raise ModelError(f"{repo_id} is gated: accept its license on the Hub with your account and pass that"
                         " account's token as HF_TOKEN (or via QLORA_SECRETS_ARN / QLORA_SECRETS_DIR)") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{repo_id} was not found on the Hub (or is private and HF_TOKEN lacks access)") from None
    except RevisionNotFoundError:
        raise ModelError(f"{repo_id} has no revision {revision!r} on the Hub: set QLORA_MODEL_REVISION to one of its"
                         " branches, tags or commits") from None
    except Exception as exc:
        unreachable = hub_unreachable(exc)
        if unreachable:
            raise StorageError(f"the Hugging Face Hub could not be reached to download {repo_id} ({unreachable}): a"
                               " network problem or a Hub outage, so a rerun may succeed. Without Hub access, put the"
                               " model in S3 or a local directory and point QLORA_MODEL there") from None
        status = _http_status(exc)
        if status in (401, 403):
            raise ModelError(f"the Hub refused access to {repo_id} (HTTP {status}): HF_TOKEN is invalid or lacks"
                             " access to it; pass a token of an account that can read it") from None
        if isinstance(exc, (HfHubHTTPError, OSError, ValueError)):
            raise ModelError(f"could not download {repo_id} from the Hub ({type(exc).__name__}: {first_line(exc)})."
                             " Without Hub access, put the model in S3 or a local directory and point QLORA_MODEL"
                             " there") from None
        raise


# HTTP statuses that say "not now" rather than "no": a request timeout and rate limiting (and every 5xx, the
# server's own failure).
TRANSIENT_HTTP_STATUSES = frozenset({408, 429})


def hub_unreachable(exc: BaseException) -> str | None:
    """Why the Hub could not be reached, when `exc` (or anything down its chain) is a network failure or a transient
    HTTP status; None when the Hub answered. huggingface_hub wraps a failed first request in an error of its own
    (raised `from` the network error) and falls back to its cache, so the cause is looked for along the chain."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    transport = _transport_errors()
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, OfflineModeIsEnabled):  # a ConnectionError, but the user's choice (HF_HUB_OFFLINE)
            return None
        status = _http_status(link)
        if status is not None and (status in TRANSIENT_HTTP_STATUSES or status >= 500):
            return f"HTTP {status}"
        if isinstance(link, transport):
            return f"{type(link).__name__}: {first_line(link)}"
        link = link.__cause__ or link.__context__
    return None


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures: the operating system's, and those of the HTTP client huggingface_hub uses (httpx2 in
    huggingface_hub 2, httpx in 1)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            http = __import__(name)
        except ImportError:
            continue
        found += [http.TimeoutException, http.NetworkError, http.RemoteProtocolError, http.ProxyError]
    return tuple(found)


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
    for file in safetensors:
        check_safetensors_file(file)
    check_shard_index(path)
    if safetensors:
        # A checkpoint stored in bitsandbytes 4-bit: every weight's packed values and state complete (another
        # quantization, 8-bit, GPTQ, AWQ, is refused here, before the data is prepared).
        stored = bnb4bit.stored_quantization(_config_json(path), f"{path}/config.json")
        if stored is not None:
            bnb4bit.check_checkpoint(path, stored)


def _config_json(model_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_dir}/config.json cannot be read as JSON ({exc}): use the model's own config.json"
                         ) from None
    if not isinstance(config, dict):
        raise ModelError(f"{model_dir}/config.json is not a JSON object: use the model's own config.json")
    return config


def stored_quantization(model_dir: Path) -> bnb4bit.Stored4bit | None:
    """How the checkpoint in `model_dir` stores its weights: None for 16/32-bit weights (quantized as they load), the
    bitsandbytes 4-bit form for a pre-quantized checkpoint; a ModelError for another quantization."""
    return bnb4bit.stored_quantization(_config_json(model_dir), f"{model_dir}/config.json")


def settings_for_checkpoint(cfg: JobConfig, model_dir: Path) -> JobConfig:
    """The settings a pre-quantized (bitsandbytes 4-bit) checkpoint trains with: its 4-bit weights are used as they
    are stored, so `quantization` and `double_quant` are the checkpoint's. Not given: taken from the checkpoint (one
    log line). Given with another value: a ConfigError (exit 2) naming it, since re-quantizing 4-bit weights to
    another 4-bit form would lose precision twice and `none` would need the 16-bit weights the checkpoint lacks."""
    stored = stored_quantization(model_dir)
    if stored is None:
        return cfg
    wanted = {"quantization": stored.quant_type, "double_quant": stored.double_quant}
    problems, taken = [], []
    for name, value in wanted.items():
        if getattr(cfg, name) == value:
            continue
        source = cfg.source_of(name)
        if source is None:
            taken.append(f"{name}={str(value).lower()}")
            continue
        given = str(getattr(cfg, name)).lower()
        problems.append(f"{source}={given}: {model_dir} is stored pre-quantized ({stored.describe()}) and its 4-bit"
                        " weights are trained on as they are" + (
                            ", so there are no 16-bit weights to train plain LoRA on" if given == "none" else "")
                        + f". Remove {env_name(name)} (or set it to {str(value).lower()}), or point QLORA_MODEL at"
                        " the 16-bit model to quantize it your way")
    if problems:
        raise ConfigError(problems)
    effective = dataclasses.replace(cfg, **wanted)
    object.__setattr__(effective, "_sources", getattr(cfg, "_sources", {}))
    log.info("pre-quantized base (%s): its 4-bit weights are loaded as stored, not quantized again%s", stored.describe(),
             f"; taken from the checkpoint: {', '.join(taken)}" if taken else "")
    return effective


def check_safetensors_file(file: Path) -> None:
    """The header must parse and the file must hold every byte it declares: a truncated download or copy is a
    model error naming the file, before minutes of loading (safetensors' format: an 8-byte little-endian header
    length, a JSON header of tensor name -> dtype, shape, [start, end) offsets, then the data)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            header_len = struct.unpack("<Q", fh.read(8))[0] if size >= 8 else -1
            if not 0 < header_len <= size - 8:
                raise ValueError(f"its header length field says {header_len} bytes in a file of {size}")
            header = json.loads(fh.read(header_len))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
        raise ModelError(f"{file}: not a valid safetensors file ({exc}): download or convert the model again"
                         ) from None
    needed = 8 + header_len + max(ends, default=0)
    if size < needed:
        raise ModelError(f"{file}: the file is truncated: {size:,} bytes where its header declares {needed:,}"
                         " (an interrupted download or copy): download or copy the model again")


def check_shard_index(path: Path) -> None:
    """A sharded checkpoint's index must name only shards that are present."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = set(weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"{index}: not a valid shard index ({exc}): download the model again") from None
    missing = sorted(s for s in shards if not (path / s).is_file())
    if missing:
        raise ModelError(f"{path}: {len(missing)} weight shard(s) named by model.safetensors.index.json are missing"
                         f" ({', '.join(missing[:3])}): download or copy the whole model again")


def device_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def is_seq2seq(model_dir: Path, cfg: JobConfig) -> bool:
    """True for a T5-class encoder-decoder, False for a decoder-only model; a ModelError for any other
    encoder-decoder, whose module names, inputs and generation the job does not know."""
    config = load_model_config(model_dir, cfg).to_dict()
    if not sizing.is_encoder_decoder(config):
        return False
    model_type = config.get("model_type")
    if model_type not in sizing.SEQ2SEQ_MODEL_TYPES:
        raise ModelError(f"{model_dir}/config.json: an encoder-decoder model of type {model_type!r}: the job trains"
                         " Llama-class decoders and T5-class encoder-decoders"
                         f" ({', '.join(sizing.SEQ2SEQ_MODEL_TYPES)}); point QLORA_MODEL at one of those")
    return True


def compute_dtype(cfg: JobConfig, seq2seq: bool = False):
    import torch

    if cfg.compute_dtype != "auto":
        return getattr(torch, cfg.compute_dtype)
    if device_kind() == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        # T5-class models overflow in float16 (their feed-forward activations exceed its range): float32 there.
        return torch.float32 if seq2seq else torch.float16
    # On CPU, bitsandbytes' bf16 dequantization path is several times faster than its float32 one
    # (measured on this project's 2-core CI machines: one SmolLM2 step 20-25 s vs 75-100 s, shared CPU).
    return torch.bfloat16


def load_tokenizer(model_dir: Path, cfg: JobConfig):
    from transformers import AutoTokenizer

    needs = "the model directory needs tokenizer.json, or tokenizer.model with tokenizer_config.json"
    if not any((Path(model_dir) / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise ModelError(f"{model_dir}: no tokenizer files: {needs}")
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_dir}: the tokenizer cannot be loaded ({first_line(exc)}); {needs}") from None


def quantization_config(cfg: JobConfig, seq2seq: bool = False) -> Any:
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "none":
        return None
    dtype = compute_dtype(cfg, seq2seq)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quantization,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=dtype,
        # Storing the packed 4-bit weights in the compute dtype lets FSDP shard them like any other tensor.
        bnb_4bit_quant_storage=dtype,
    )


def load_model(model_dir: Path, cfg: JobConfig, local_rank: int = 0, seq2seq: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    device = device_kind()
    dtype = compute_dtype(cfg, seq2seq)
    stored = stored_quantization(model_dir)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": cfg.attn_implementation,
        "trust_remote_code": cfg.trust_remote_code,
        "quantization_config": quantization_config(cfg, seq2seq),
        "device_map": {"": local_rank} if device == "cuda" else {"": "cpu"},
    }
    if stored is not None:
        # Loaded as stored (transformers deserializes the 4-bit weights, nothing is quantized again), computing in the
        # job's dtype: the stored compute dtype is a loading choice of whoever saved it, not part of the weights.
        check_prequantized_settings(cfg, stored, model_dir)
        config = load_model_config(model_dir, cfg)
        config.quantization_config = {**config.quantization_config,
                                      "bnb_4bit_compute_dtype": str(dtype).removeprefix("torch.")}
        kwargs.update(config=config, quantization_config=None)
    if not cfg.allow_pickle_weights:
        kwargs["use_safetensors"] = True
    log.info("loading %s (%s, compute %s) on %s", model_dir,
             f"stored {stored.describe()}" if stored else cfg.quantization, str(dtype).removeprefix("torch."), device)
    try:
        auto_class = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        model, info = auto_class.from_pretrained(model_dir, output_loading_info=True, **kwargs)
    except ImportError as exc:  # an attention kernel (flash-attn) or a model's requirement that is not installed
        raise ConfigError([f"QLORA_ATTN_IMPLEMENTATION={cfg.attn_implementation!r} (or the model) needs a package this"
                           f" environment lacks ({first_line(exc)}): use QLORA_ATTN_IMPLEMENTATION=sdpa, or install"
                           " it in the image"]) from None
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{model_dir}: the model cannot be loaded ({type(exc).__name__}: {exc})") from None
    except RuntimeError as exc:  # transformers raises this for tensors whose shapes differ from config.json's
        if "mismatch" in str(exc).lower():
            raise ModelError(f"{model_dir}: the weights' shapes do not match config.json ({first_line(exc)}): the"
                             " config belongs to another model; use the model's own config.json") from None
        if stored is not None and "conversion" in str(exc).lower():  # a stored 4-bit weight it could not rebuild
            raise ModelError(f"{model_dir}: transformers could not rebuild the stored 4-bit weights"
                             f" ({first_line(exc)}): the checkpoint is damaged; download it again") from None
        raise
    if stored is not None:
        info = {**info, "missing_keys": [*(info.get("missing_keys") or []), *missing_4bit_states(model)]}
    check_loading_info(model_dir, info, quantized_shape_mismatches(model))
    if stored is not None:
        store_4bit_as(model, dtype)
    # The KV cache is useless in training and conflicts with checkpointing (T5's encoder and decoder stacks read
    # copies of the config of their own).
    for module in model.modules():
        if hasattr(getattr(module, "config", None), "use_cache"):
            module.config.use_cache = False
    changed = perf.patch_model(model, cfg.packing, cfg.attn_implementation, device == "cuda")  # varlen attention
    if changed:
        log.info("fast path: %s", changed)
    if device == "cuda":
        torch.cuda.empty_cache()
    else:
        keep_cpu_weights_trainable(model)
    return model


def load_model_config(model_dir: Path, cfg: JobConfig) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{model_dir}/config.json cannot be read as a model config ({first_line(exc)}): use the"
                         " model's own config.json") from None


def check_prequantized_settings(cfg: JobConfig, stored: bnb4bit.Stored4bit, model_dir: Path) -> None:
    """`cfg` must describe the stored form (settings_for_checkpoint makes it so): a caller that skipped that step would
    otherwise train on one quantization and merge as another."""
    if (cfg.quantization, cfg.double_quant) != (stored.quant_type, stored.double_quant):
        raise ConfigError([f"QLORA_QUANTIZATION={cfg.quantization}, QLORA_DOUBLE_QUANT={str(cfg.double_quant).lower()}:"
                           f" {model_dir} is stored pre-quantized ({stored.describe()}); leave both unset, or set"
                           " them to the stored form"])


def store_4bit_as(model: Any, dtype: Any) -> int:
    """Reinterpret the packed 4-bit weights deserialized from a checkpoint (uint8) as `dtype`, as the job stores them
    when it quantizes as it loads (bnb_4bit_quant_storage = the compute dtype, so that FSDP shards them like any other
    tensor): the same bytes, the same layer, one form for every later step. Returns the number of weights changed."""
    import torch

    changed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if getattr(weight, "quant_state", None) is None or weight.dtype != torch.uint8:
            continue
        if weight.numel() % dtype.itemsize:
            continue  # cannot be viewed as `dtype` (an odd size): left in uint8, which computes the same
        weight.data = weight.data.reshape(-1).view(dtype).reshape(-1, 1)
        weight.quant_storage = dtype
        changed += 1
    quantizer = getattr(model, "hf_quantizer", None)
    if changed and quantizer is not None:
        quantizer.quantization_config.bnb_4bit_quant_storage = dtype
    return changed


def quantized_shape_mismatches(model: Any) -> list[str]:
    """4-bit layers whose checkpoint tensor had another shape than config.json gives the layer: bitsandbytes
    quantizes whatever tensor it is handed (the original shape is in its quant_state), and transformers does not
    report the mismatch for quantized weights; the first forward pass would fail, or worse, broadcast."""
    found = []
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and hasattr(module, "out_features"):
            if tuple(state.shape) != (module.out_features, module.in_features):
                found.append(f"{name}.weight {list(state.shape)} vs {[module.out_features, module.in_features]}")
    return found


def missing_4bit_states(model: Any) -> list[str]:
    """4-bit weights loaded without their quantization state: a pre-quantized checkpoint whose packed values came
    without their state parts is loaded as raw bytes, without a word from transformers."""
    return [f"{name}.weight.quant_state" for name, module in model.named_modules()
            if type(module).__name__ == "Linear4bit" and getattr(module.weight, "quant_state", None) is None]


def check_loading_info(model_dir: Path, info: dict[str, Any], quantized_mismatches: list[str] = ()) -> None:
    """Every weight of the architecture must come from the checkpoint, and every tensor of the checkpoint must be
    used: transformers fills missing weights with random values (and drops unused ones) with only a log line, and
    a job would then train and publish a partly random model with exit 0."""
    problems = []
    if quantized_mismatches:
        problems.append(f"{len(quantized_mismatches)} tensor(s) of another shape than config.json says:"
                        f" {', '.join(quantized_mismatches[:3])}{' ...' if len(quantized_mismatches) > 3 else ''}")
    for kind, what in (("missing_keys", "missing from the checkpoint (they would be random)"),
                       ("unexpected_keys", "in the checkpoint but not in the architecture of config.json"),
                       ("mismatched_keys", "of another shape than config.json says")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(kind) or [])
        if names:
            problems.append(f"{len(names)} tensor(s) {what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}")
    if info.get("error_msgs"):
        problems.append("; ".join(str(m) for m in info["error_msgs"])[:300])
    if problems:
        raise ModelError(f"{model_dir}: the weights do not match the model's config.json: {'; '.join(problems)}."
                         " The checkpoint is incomplete, damaged or of another architecture: download it again, or"
                         " point QLORA_MODEL at the model's complete directory")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def cap_gpu_memory(gib: float, device_index: int = 0) -> float:
    """Limit this process's CUDA allocator to `gib` GiB (the batch plan reads the same limit); returns the fraction.
    Call it before the batch plan and the model load; 0 (the setting's default) leaves the whole GPU."""
    import torch

    if not gib or not torch.cuda.is_available():
        return 1.0

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
