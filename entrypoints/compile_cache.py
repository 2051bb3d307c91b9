"""A persistent torch.compile cache: a run's compiled kernels kept with its checkpoints and, optionally, in a store
shared by runs, so that a resumed run or a scheduled retrain on a fresh container compiles from cache, not from
scratch (the job compiles its decoder layers on CUDA: entrypoints.perf.compile_layers, ~a minute for 7B).

    QLORA_COMPILE_CACHE=auto | off | /an/absolute/dir | s3://bucket/prefix      (entrypoints/config.py)

What is kept is torch's portable compile cache ("mega-cache"): `torch.compiler.save_cache_artifacts()` serializes
every cache entry this process compiled or found (inductor's FX graph cache, with the Triton kernels bundled into it,
AOTAutograd's cache, autotuning results); `torch.compiler.load_cache_artifacts()` writes them into this process's
own on-disk caches (TORCHINDUCTOR_CACHE_DIR), where the compilation that follows finds them. torch's own keys
decide what is reused, so a stale entry is never used for other code; the job's key (`key_parts`: torch and Triton
versions, GPU and compute capability, CUDA version, the model's config, compute dtype, LoRA, recomputed layers)
names the file and keeps artifacts of other setups from being loaded or overwriting each other.

One file per artifact: a magic line, a JSON header line (the key, its parts, the payload's size and sha256) and
torch's payload. A file that is damaged, of another setup, or that torch cannot load is logged in one line and the
job compiles from scratch: the cache never fails the job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from entrypoints import storage
from entrypoints.config import compile_cache_store

log = logging.getLogger("qlora.compile_cache")

CHECKPOINT_FILE = "torch-compile-cache.bin"  # in every checkpoint directory, written before its COMPLETE marker
MAGIC = b"QLORA-TORCH-COMPILE-CACHE 1\n"
STORE_ATTEMPTS = 2  # a cache is not worth the minutes the outputs' retries wait out an S3 outage
STORE_SAVE_AFTER_STEPS = 2  # the first optimizer steps compile the forward and backward passes


class DamagedCache(ValueError):
    """The file is not a whole compile-cache file."""


# ------------------------------------------------------------------------------------------- the key
def key_parts(model_config: Any, compute_dtype: str, recomputed_layers: Sequence[int],
              training: Mapping[str, Any]) -> dict[str, Any]:
    """What makes compiled kernels reusable: this machine's software and GPU, the model's architecture (its config,
    hashed) and compute dtype, which decoder layers are recomputed (compiled whole or block by block: perf.compile_layers)
    and the training settings that change the compiled graphs (`training`: LoRA, attention, offload)."""
    import torch

    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        device = f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor})"
    else:
        device = f"cpu ({platform.machine()})"
    config = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    # Where the model was loaded from and which transformers wrote its config do not change its kernels.
    config = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("name_or_path", "transformers_version")}
    return {
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "device": device,
        "model_config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16],
        "compute_dtype": compute_dtype,
        "recomputed_layers": _ranges(recomputed_layers),
        **{k: training[k] for k in sorted(training)},
    }


def cache_key(parts: Mapping[str, Any]) -> str:
    """A short hash of the key's parts (names the store's file)."""
    return hashlib.sha256(json.dumps(dict(parts), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _ranges(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"; none -> "none"."""
    out: list[str] = []
    for i in sorted(set(indices)):
        if out and out[-1].split("-")[-1] == str(i - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out) or "none"


# ------------------------------------------------------------------------------------------- the file
def encode(payload: bytes, parts: Mapping[str, Any], artifacts: Mapping[str, int]) -> bytes:
    header = {"key": cache_key(parts), "parts": dict(parts), "payload_bytes": len(payload),
              "payload_sha256": hashlib.sha256(payload).hexdigest(), "artifacts": dict(artifacts),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return MAGIC + json.dumps(header, sort_keys=True, default=str).encode() + b"\n" + payload


def decode(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, payload); DamagedCache when the bytes are not a whole file of this format."""
    if not data.startswith(MAGIC):
        raise DamagedCache("it does not start like a compile-cache file")
    line_end = data.find(b"\n", len(MAGIC))
    if line_end < 0:
        raise DamagedCache("its header is cut off")
    try:
        header = json.loads(data[len(MAGIC):line_end])
        size, digest = int(header["payload_bytes"]), str(header["payload_sha256"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DamagedCache(f"its header cannot be read ({type(exc).__name__})") from None
    payload = data[line_end + 1:]
    if len(payload) != size or hashlib.sha256(payload).hexdigest() != digest:
        raise DamagedCache(f"its content is {len(payload):,} bytes that do not match the {size:,} bytes and sha256 its"
                           " header records (a truncated or damaged file)")
    return header, payload


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _differences(there: Mapping[str, Any], here: Mapping[str, Any]) -> str:
    def shown(value: Any) -> str:
        text = str(value)
        return text if len(text) <= 60 else text[:57] + "..."

    names = sorted(k for k in set(there) | set(here) if there.get(k) != here.get(k))
    return "; ".join(f"{k}: {shown(there.get(k))!r} there, {shown(here.get(k))!r} here" for k in names)


# ------------------------------------------------------------------------------------------- the cache of a run
class CompileCache:
    """The compile cache of one run. `setting`: QLORA_COMPILE_CACHE (`auto`, or a shared store: an absolute directory
    or an s3:// prefix; `off` makes no CompileCache at all). Every method logs what it did and never raises."""

    def __init__(self, setting: str, parts: Mapping[str, Any], endpoint_url: str = "") -> None:
        self.setting = setting
        self.parts = dict(parts)
        self.key = cache_key(parts)
        self.endpoint_url = endpoint_url
        self.loaded: dict[str, Any] | None = None  # where from, artifacts, bytes, seconds
        self.saved: list[dict[str, Any]] = []
        self._store_digest: str | None = None  # sha256 of the payload the store holds (loaded or saved by this run)

    @property
    def store_uri(self) -> str | None:
        """The shared store's file for this key (None for `auto`)."""
        store = compile_cache_store(self.setting)
        return storage.join(store, f"torch-compile-{self.key}.bin") if store else None

    # -------------------------------------------------------------------------------------- load
    def load(self, checkpoint: Path | None = None) -> bool:
        """Before the first forward pass: the artifact of the checkpoint the run resumes from, else the store's for
        this key. Whether one was loaded."""
        if checkpoint is not None:
            path = checkpoint / CHECKPOINT_FILE
            if path.is_file():
                if self._load_from(str(path), lambda: path.read_bytes()):
                    return True
            else:
                log.info("compile cache: none in %s (it was saved without one)", checkpoint)
        uri = self.store_uri
        if uri is None:
            return False
        return self._load_from(uri, lambda: storage.read_bytes(uri, endpoint_url=self.endpoint_url,
                                                               attempts=STORE_ATTEMPTS))

    def _load_from(self, where: str, read) -> bool:
        started = time.monotonic()
        try:
            data = read()
        except Exception as exc:  # noqa: BLE001 - a cache must not fail the job: an unreadable store is a slower start
            log.warning("compile cache: could not read %s (%s): compiling from scratch", where, _reason(exc))
            return False
        if data is None:
            log.info("compile cache: none for this key (%s) at %s", self.key, where)
            return False
        try:
            header, payload = decode(data)
        except DamagedCache as exc:
            log.warning("compile cache: %s is damaged (%s): compiling from scratch", where, exc)
            return False
        if header.get("key") != self.key:
            log.info("compile cache: %s not loaded: it was made for another setup (%s)", where,
                     _differences(header.get("parts") or {}, self.parts))
            return False
        try:
            info = _torch_load(payload)
        except Exception as exc:  # noqa: BLE001 - torch's own errors while it writes its caches: compile instead
            log.warning("compile cache: torch could not load %s (%s): compiling from scratch", where, _reason(exc))
            return False
        if info is None:
            log.warning("compile cache: torch could not load %s (its artifacts do not deserialize with torch %s):"
                        " compiling from scratch", where, self.parts.get("torch"))
            return False
        counts = {kind: len(keys) for kind, keys in info.artifacts.items()}
        seconds = time.monotonic() - started
        self.loaded = {"from": where, "artifacts": sum(counts.values()), "by_kind": counts, "bytes": len(payload),
                       "seconds": round(seconds, 2)}
        if where == self.store_uri:
            self._store_digest = header["payload_sha256"]
        log.info("compile cache: loaded %d artifacts (%s) from %s in %.1f s", sum(counts.values()), _mb(len(payload)),
                 where, seconds)
        return True

    # -------------------------------------------------------------------------------------- save
    def save_to_checkpoint(self, checkpoint: Path) -> None:
        """Into a checkpoint directory before its COMPLETE marker is written (checkpoints.trainer_callback), so it is
        mirrored and synced with the checkpoint and a half-written file is never in a complete checkpoint."""
        where = str(checkpoint / CHECKPOINT_FILE)
        self._save(where, lambda data: storage.write_bytes(where, data))

    def save_to_store(self, when: str) -> None:
        """Into the shared store (no-op for `auto`), unless it already holds exactly these artifacts."""
        uri = self.store_uri
        if uri is None:
            return
        self._save(uri, lambda data: storage.write_bytes(uri, data, endpoint_url=self.endpoint_url,
                                                               attempts=STORE_ATTEMPTS, unique_partial=True),
                   when=when, store=True)

    def _save(self, where: str, write, when: str = "", store: bool = False) -> None:
        started = time.monotonic()
        try:
            artifacts = _torch_save()
            if artifacts is None:
                log.info("compile cache: nothing to save to %s (torch recorded no cacheable compilation)", where)
                return
            payload, counts = artifacts
            digest = hashlib.sha256(payload).hexdigest()
            if store and digest == self._store_digest:
                log.info("compile cache: %s already holds these %d artifacts: not saved again", where,
                         sum(counts.values()))
                return
            write(encode(payload, self.parts, counts))
        except Exception as exc:  # noqa: BLE001 - a cache must not fail the job (or a checkpoint)
            log.warning("compile cache: could not save to %s (%s); the next start compiles from scratch", where,
                        _reason(exc))
            return
        if store:
            self._store_digest = digest
        seconds = time.monotonic() - started
        self.saved.append({"to": where, "artifacts": sum(counts.values()), "bytes": len(payload),
                           "seconds": round(seconds, 2)})
        log.info("compile cache: saved %d artifacts (%s) to %s%s in %.1f s", sum(counts.values()), _mb(len(payload)),
                 where, f" {when}" if when else "", seconds)

    # -------------------------------------------------------------------------------------- report
    def record(self) -> dict[str, Any]:
        """For the manifest's metrics: the setting, key, what was loaded and saved, and torch's cache counters."""
        return {"setting": self.setting, "key": self.key, "loaded": self.loaded is not None,
                "loaded_from": (self.loaded or {}).get("from"), "load": self.loaded,
                "saves": len(self.saved), "last_save": self.saved[-1] if self.saved else None,
                "counters": cache_counters()}

    def callback(self):
        """A TrainerCallback that saves to the shared store once the first optimizer steps of this run have compiled
        and again when training ends (world rank 0 only); the CompileCache itself is its `compile_cache`."""
        from transformers import TrainerCallback

        cache = self

        class CompileCacheSaver(TrainerCallback):
            compile_cache = cache

            def __init__(self) -> None:
                self.first_step: int | None = None
                self.saved_early = False

            def on_train_begin(self, args, state, control, **kwargs):
                self.first_step = state.global_step  # a resumed run compiles in its own first steps

            def on_step_end(self, args, state, control, **kwargs):
                if (not self.saved_early and state.is_world_process_zero
                        and state.global_step >= (self.first_step or 0) + STORE_SAVE_AFTER_STEPS):
                    self.saved_early = True
                    cache.save_to_store(f"after step {state.global_step}")

            def on_train_end(self, args, state, control, **kwargs):
                if state.is_world_process_zero:
                    cache.save_to_store("at the end of training")

        return CompileCacheSaver()


def of(trainer: Any) -> CompileCache | None:
    """The CompileCache that trainer.build_trainer gave this trainer (None: the run does not compile, or `off`)."""
    for callback in trainer.callback_handler.callbacks:
        cache = getattr(callback, "compile_cache", None)
        if isinstance(cache, CompileCache):
            return cache
    return None


def cache_counters() -> dict[str, int]:
    """torch's cache hit/miss counters of this process (inductor's FX graph cache, AOTAutograd's cache)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - torch without Dynamo
        return {}
    return {name: int(value) for group in ("inductor", "aot_autograd") for name, value in counters[group].items()
            if name.startswith(("fxgraph_cache", "autograd_cache"))}


def _torch_save() -> tuple[bytes, dict[str, int]] | None:
    import torch

    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    payload, info = saved
    return payload, {kind: len(keys) for kind, keys in info.artifacts.items()}


def _torch_load(payload: bytes) -> Any:
    """torch's CacheInfo, or None when torch cannot deserialize the payload (it would log a traceback for that:
    quieted here, the caller logs one line)."""
    import torch

    quiet = logging.getLogger("torch.compiler._cache")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return torch.compiler.load_cache_artifacts(payload)
    finally:
        quiet.setLevel(level)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
