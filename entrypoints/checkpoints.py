"""Checkpoints that are never mistaken for complete when they are not, and preemption that saves one.

A checkpoint directory counts only once it holds the COMPLETE marker, written after the Trainer has
finished writing every file of it. With QLORA_CHECKPOINT_URI, each complete checkpoint is mirrored to
S3 (marker last) and a restarted job with an empty disk restores the newest complete one from there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from entrypoints import storage
from entrypoints.errors import ConfigError, Preempted

log = logging.getLogger("qlora.checkpoints")

MARKER = "COMPLETE"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _step(path: Path | str) -> int:
    m = CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else -1


# Settings that change what a resumed run would compute. max_steps / num_epochs are left out on purpose:
# resuming with a longer schedule is how users extend a run (a shorter one than the checkpoint is refused).
FINGERPRINT_FIELDS = (
    "model", "model_revision", "data", "data_format", "eval_data", "eval_fraction", "chat_template",
    "quantization", "double_quant", "compute_dtype", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
    "max_seq_length", "micro_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
    "warmup_ratio", "weight_decay", "max_grad_norm", "optim", "packing", "assistant_only_loss", "seed",
    "eval_steps", "early_stopping_patience", "early_stopping_threshold",
)


def settings_fingerprint(settings: dict) -> dict:
    return {name: settings[name] for name in FINGERPRINT_FIELDS if name in settings}


def run_fingerprint(settings: dict, content: dict[str, str | None], batch: dict[str, int]) -> dict:
    """What a checkpoint must match to be resumed: the settings that change the computation, the content of the
    inputs (sha256 of the training data, the eval data and the base model's files: the same URI may hold other
    bytes on a rerun) and the batch layout the data position is counted in (rows per micro-batch, micro-batches
    per step, processes: a checkpoint's step N means other samples under another layout)."""
    return {**settings_fingerprint(settings), **{k: v for k, v in content.items() if v is not None},
            **{f"batch_{k}": v for k, v in batch.items()}}


# Files of a model directory that do not change the model.
_NOT_MODEL_CONTENT = ("readme", "license", "notice", "use_policy", ".")


def model_files(model_dir: Path) -> list[Path]:
    """The files that make up a base model (config, tokenizer, weights), for its content fingerprint."""
    return sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.lower().startswith(_NOT_MODEL_CONTENT))


def file_sha256s(files: list[Path], cache_file: Path | None = None, threads: int = 4) -> dict[Path, str]:
    """The sha256 of every file, hashed on `threads` threads (hashlib releases the GIL); with `cache_file`, a file
    whose path, size, modification time and inode are unchanged since it was last hashed is not read again (a 13 GB
    model would otherwise cost a minute on every rerun)."""
    from concurrent.futures import ThreadPoolExecutor

    cache: dict[str, list] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}

    def key(path: Path) -> list:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ino]

    def digest(path: Path) -> str:
        known = cache.get(str(path.resolve()))
        if known and known[:3] == key(path):
            return known[3]
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        return h.hexdigest()

    paths = sorted(files)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        digests = dict(zip(paths, pool.map(digest, paths), strict=True))
    for path, value in digests.items():
        cache[str(path.resolve())] = [*key(path), value]
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(cache_file.name + ".tmp")
            tmp.write_text(json.dumps(cache))
            tmp.replace(cache_file)
        except OSError as exc:  # a cache only: never fail the job for it
            log.debug("could not write %s: %s", cache_file, exc)
    seconds = time.monotonic() - started
    if seconds > 5:
        log.info("hashed %d file(s) (%.1f GiB) in %.0f s", len(paths), sum(p.stat().st_size for p in paths) / 2**30,
                 seconds)
    return digests


def content_sha256(files: list[Path], root: Path | None, cache_file: Path | None = None,
                   digests: dict[Path, str] | None = None) -> str:
    """sha256 over (path relative to `root`, sha256 of the file) of every file: a fingerprint of their content."""
    digests = digests if digests is not None else file_sha256s(files, cache_file)
    total = hashlib.sha256()
    for path in sorted(files):
        total.update((path.relative_to(root).as_posix() if root else path.name).encode())
        total.update(digests[path].encode())
    return total.hexdigest()


def latest_complete(checkpoint_dir: Path, fingerprint: dict | None = None) -> Path | None:
    """The newest checkpoint with a COMPLETE marker. With `fingerprint`, a checkpoint written with other
    training settings is refused with a ConfigError rather than silently continued."""
    if not checkpoint_dir.is_dir():
        return None
    candidates = sorted((p for p in checkpoint_dir.iterdir() if p.is_dir() and _step(p) >= 0), key=_step, reverse=True)
    for path in candidates:
        marker = path / MARKER
        missing = _missing(path)
        if missing:
            log.warning("ignoring incomplete checkpoint %s (%s missing: the job stopped while saving or restoring it)",
                        path, ", ".join(missing))
            continue
        saved = json.loads(marker.read_text() or "{}").get("settings")
        if fingerprint is not None and saved != fingerprint:
            if saved is None:
                raise ConfigError([f"{path} records no settings fingerprint (an older job wrote it): it cannot be"
                                   " checked against this run's data and settings. Delete it, use a new"
                                   " QLORA_CHECKPOINT_DIR, or set QLORA_RESUME=false to start over in place"])
            changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
            raise ConfigError([f"{path} was written by a run with other inputs or settings ({', '.join(changed)}"
                               " differ): resuming would mix two runs and publish the old one's adapter. Use a new"
                               " QLORA_CHECKPOINT_DIR, delete the old checkpoints, or set QLORA_RESUME=false to"
                               " start over in place"])
        return path
    return None


def remove_incomplete(checkpoint_dir: Path) -> None:
    if not checkpoint_dir.is_dir():
        return
    for path in checkpoint_dir.iterdir():
        if path.is_dir() and _step(path) >= 0 and _missing(path):
            shutil.rmtree(path, ignore_errors=True)


def _missing(path: Path) -> list[str]:
    """What a checkpoint lacks to be resumed: its COMPLETE marker, or a file the marker vouches for (a marker without
    them is a restore interrupted before it finished)."""
    if not (path / MARKER).is_file():
        return [MARKER]
    return [name for name in REQUIRED_FILES if not (path / name).is_file()]


def mark_complete(path: Path, step: int, fingerprint: dict | None = None, total_steps: int | None = None) -> None:
    """`total_steps`: the step the run that wrote it was going to end at (its learning-rate schedule's length)."""
    tmp = path / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"step": step, "time": time.time(), "settings": fingerprint, "total_steps": total_steps}))
    tmp.replace(path / MARKER)


def checkpoint_total_steps(path: Path) -> int | None:
    """The total steps recorded in a checkpoint's marker (None for a marker without it)."""
    try:
        return json.loads((path / MARKER).read_text() or "{}").get("total_steps")
    except (OSError, ValueError):
        return None


# Files without which a checkpoint cannot be resumed (the Trainer's state, the adapter).
REQUIRED_FILES = ("trainer_state.json", "adapter_model.safetensors")


def restore_from_uri(uri: str, checkpoint_dir: Path, endpoint_url: str, fingerprint: dict | None = None
                     ) -> Path | None:
    """Download the newest complete remote checkpoint of this run (its marker's fingerprint equals
    `fingerprint`) when the local directory has no complete checkpoint."""
    if latest_complete(checkpoint_dir) is not None:
        return None
    objects = storage.list_objects(uri.rstrip("/") + "/", endpoint_url=endpoint_url)
    complete = sorted({o.relative.split("/")[0] for o in objects if o.relative.endswith("/" + MARKER)}, key=_step)
    others = []

    def ours(name: str) -> bool:
        if fingerprint is None:
            return True
        marker = storage.read_text(storage.join(uri, name, MARKER), endpoint_url=endpoint_url) or "{}"
        return json.loads(marker).get("settings") == fingerprint

    def download(name: str) -> Path:
        log.info("restoring checkpoint %s from %s", name, uri)
        # The marker last (S3 lists COMPLETE before the lower-case file names): interrupted, the restore leaves a
        # checkpoint without its marker, which the next run deletes and restores again.
        parts = sorted((o for o in objects if o.relative.startswith(name + "/")), key=lambda o: o.relative.endswith(
            "/" + MARKER))
        for obj in parts:
            storage.download_file(obj.uri, checkpoint_dir / obj.relative, size=obj.size, endpoint_url=endpoint_url)
        return checkpoint_dir / name

    for name in reversed(complete):
        if not ours(name):
            others.append(name)
            continue
        target = download(name)
        if _missing(target):
            return None
        # With periodic evaluation the run's result is its best evaluated checkpoint, which rotation keeps: restore
        # it too, or the resumed run would publish its last adapter instead.
        best = _best_name(target)
        if best and best != name and best in complete and ours(best):
            download(best)
        return target
    if others:
        log.warning("%s holds %d complete checkpoint(s) (%s) written by runs with other inputs or settings: not"
                    " restored; this run starts from step 0", uri, len(others), ", ".join(others[:3]))
    return None


def _best_name(checkpoint: Path) -> str | None:
    try:
        named = json.loads((checkpoint / "trainer_state.json").read_text()).get("best_model_checkpoint")
    except (OSError, ValueError):
        return None
    return Path(named).name if named else None


def localize_best(checkpoint: Path) -> None:
    """Point the best checkpoint that `checkpoint`'s trainer_state.json names at this directory: the state holds the
    path it was saved under, and the Trainer ignores a best checkpoint whose path does not exist (restored on another
    machine, or under another QLORA_CHECKPOINT_DIR), publishing the last adapter instead of the best."""
    state_file = checkpoint / "trainer_state.json"
    name = _best_name(checkpoint)
    if not name or not (checkpoint.parent / name).is_dir():
        return
    state = json.loads(state_file.read_text())
    here = str(checkpoint.parent / name)
    if state.get("best_model_checkpoint") != here:
        state["best_model_checkpoint"] = here
        tmp = state_file.with_name(state_file.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        tmp.replace(state_file)


def clear_checkpoints(checkpoint_dir: Path) -> None:
    """QLORA_RESUME=false: start over in place, so that no old checkpoint is ever taken for this run's."""
    if not checkpoint_dir.is_dir():
        return
    old = [p for p in checkpoint_dir.iterdir() if p.is_dir() and _step(p) >= 0]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    if old:
        log.info("resume is off: removed %d old checkpoint(s) from %s", len(old), checkpoint_dir)


def mirror_to_uri(path: Path, uri: str, endpoint_url: str) -> None:
    dest = storage.join(uri, path.name)
    storage.upload_tree(path, dest, endpoint_url=endpoint_url, exclude=(MARKER,))
    storage.upload_file(path / MARKER, storage.join(dest, MARKER), endpoint_url=endpoint_url)


class StopFlag:
    """Set by SIGTERM/SIGINT. Before training starts the signal interrupts at once; during training the
    Trainer callback saves a checkpoint at the end of the current step and stops."""

    # An interrupt raised by the handler can be swallowed where Python ignores exceptions (logging's after-fork hook
    # while datasets starts its worker pool): until the job acknowledges the stop, the signal is sent again.
    RESIGNAL_SECONDS = 3.0
    RESIGNAL_TIMES = 10

    def __init__(self) -> None:
        self.event = threading.Event()
        self.acknowledged = threading.Event()
        self.training = False
        self.signal_name = ""
        self.owner_pid = os.getpid()
        self._resignal: threading.Thread | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self.owner_pid = os.getpid()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.owner_pid:
            # A worker process forked from the job (datasets' multi-process tokenization) inherits this handler.
            # Raising there would leave the worker half-way through a pool operation, holding its queue's lock,
            # and the pool's shutdown would wait on that lock forever: a worker dies the default way instead, and
            # the job itself (which gets the signal too, or terminates its pool) stops with exit 75.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal_name = signal.Signals(signum).name
        self.event.set()
        log.warning("%s received: %s", self.signal_name,
                    "saving a checkpoint after the current step" if self.training else "stopping")
        if not self.training:
            self._resignal_until_acknowledged(signum)
            raise KeyboardInterrupt(self.signal_name)

    def _resignal_until_acknowledged(self, signum: int) -> None:
        if self._resignal is not None:
            return

        def again() -> None:
            for _ in range(self.RESIGNAL_TIMES):
                if self.acknowledged.wait(self.RESIGNAL_SECONDS) or self.training:
                    return
                log.warning("%s: the job has not stopped yet; signalling it again", self.signal_name)
                os.kill(self.owner_pid, signum)

        self._resignal = threading.Thread(target=again, name="stop-resignal", daemon=True)
        self._resignal.start()

    def acknowledge(self) -> None:
        """The job is stopping because of the signal: no need to send it again."""
        self.acknowledged.set()

    def check(self, where: str) -> None:
        """Raise Preempted when a signal arrived (between the steps of the job, the signal's own interrupt may have
        been swallowed by a library)."""
        if self.event.is_set():
            self.acknowledge()
            raise Preempted(f"{self.signal_name} received {where}, before a checkpoint could be saved; run the job"
                            " again with the same settings to resume")

    def is_set(self) -> bool:
        return self.event.is_set()

    def set_by_other_rank(self) -> None:
        """Another rank of a torchrun launch got the signal first: stop at the same step as it does."""
        if not self.event.is_set():
            self.signal_name = "SIGTERM (seen by another rank)"
            self.event.set()


def _any_rank(flag: bool, args) -> bool:
    """True when `flag` is true on any rank (the flag itself in a single process)."""
    if args.world_size <= 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], device=args.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _wait_for_every_rank(args) -> None:
    if args.world_size > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def trainer_callback(stop: StopFlag, checkpoint_uri: str, endpoint_url: str, fingerprint: dict | None = None,
                     before_complete: Callable[[Path], None] | None = None):
    """A transformers TrainerCallback (built lazily so this module stays importable without torch). `before_complete`:
    called by world rank 0 with each checkpoint's directory after the Trainer has written it and before it is marked
    complete (and mirrored): what it adds is part of the checkpoint (the compile cache: compile_cache.CompileCache)."""
    from transformers import TrainerCallback

    class CheckpointCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            # Under torchrun each rank gets the signal on its own, possibly a step apart: they agree on it every
            # step, so all of them stop and save at the same step instead of one waiting in a collective forever.
            if _any_rank(stop.is_set(), args):
                stop.set_by_other_rank()
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_save(self, args, state, control, **kwargs):
            # Each rank writes its own RNG state into the checkpoint: complete only once every rank has written.
            # Every host has its own copy (save_on_each_node), which its local rank 0 marks complete; world rank 0
            # alone mirrors its copy.
            _wait_for_every_rank(args)
            if not state.is_local_process_zero:
                return control
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir():
                if before_complete is not None and state.is_world_process_zero:
                    before_complete(path)
                mark_complete(path, state.global_step, fingerprint, state.max_steps)
                if checkpoint_uri and state.is_world_process_zero:
                    mirror_to_uri(path, checkpoint_uri, endpoint_url)
                log.info("checkpoint %s complete", path.name)
            return control

    return CheckpointCallback()
