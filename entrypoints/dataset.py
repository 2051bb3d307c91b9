"""Where data becomes tokens: records -> chat template -> token ids and loss masks in Arrow caches, the eval
split, the held-out samples, and the data report: what is trained on (after truncation), per source, and the limits
on truncation and duplicates that fail the job before any GPU time (`python -m entrypoints.data URI --report` prints
the same report without training). For an encoder-decoder (seq2seq) model: records -> (input, target) token ids
(`input_ids`, `labels`; templating.tokenize_seq2seq).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from entrypoints.config import JobConfig, env_name
from entrypoints.data import LoadStats, RecordError, load_conversations
from entrypoints.errors import ConfigError, DataError, JobError

log = logging.getLogger("qlora.dataset")
PROGRESS_RECORDS = 100_000  # a log line every so many records read (a million records take minutes)


@dataclass
class TokenizedData:
    train: Any
    eval: Any | None
    samples: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)


def _split_sample(conv: list[dict[str, str]] | str) -> dict[str, Any] | None:
    if isinstance(conv, str):
        return None
    last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
    question = next((m["content"] for m in reversed(conv[:last]) if m["role"] == "user"), "")
    return {"messages": conv[:last], "prompt": question, "reference": conv[last]["content"]}


def prepare_data(cfg: JobConfig, data: Path | Sequence[Path], eval_data: Path | None, tokenizer: Any,
                 template: str | None, fresh_cache: bool = True, enforce_limits: bool = True,
                 seq2seq: bool = False) -> TokenizedData:
    """Read, hold out, mix, tokenize and count the data, into Arrow caches in the job's work dir (memory stays flat
    however large the data is), and log the data report. `data`: one source, or the local copies of several (in the
    order of `cfg.data_sources`), mixed as `mix_sources` says. `fresh_cache=False` (a host's other ranks, after its
    local rank 0 has built them) reuses the caches of this job instead of starting over. `enforce_limits=False` leaves
    the truncation and duplicate limits to the caller (the inspector prints the report first). `seq2seq`: (input,
    target) pairs for an encoder-decoder model instead of token ids with loss masks."""
    cache_dir = cfg.paths.work_dir / "datasets-cache"
    if fresh_cache:
        # `datasets` fingerprints a generator by its code, not by the file's content: a cache left by an earlier
        # run over changed data at the same path would otherwise be reused silently.
        shutil.rmtree(cache_dir, ignore_errors=True)
    check = _seq2seq_check if seq2seq else template_check(tokenizer, template)
    paths = [data] if isinstance(data, Path) else list(data)
    mixing = len(paths) > 1
    names = cfg.data_sources if mixing and len(cfg.data_sources) == len(paths) else [str(p) for p in paths]
    train_stats = [LoadStats() for _ in paths]
    raws = [_read(cfg, path, st, cache_dir, check, held_out=False, mix_source=i if mixing else None)
            for i, (path, st) in enumerate(zip(paths, train_stats, strict=True))]
    files = [{**f, "source": name} if mixing else f
             for path, st, name in zip(paths, train_stats, names, strict=True) for f in _sources(path, st)]
    stats: dict[str, Any] = {"format": ",".join(dict.fromkeys(f for st in train_stats for f in st.fmt.split(",") if f)),
                             "train_records_read": sum(st.records for st in train_stats),
                             "bad_records_skipped": sum(st.skipped for st in train_stats),
                             "empty_answers_skipped": sum(st.empty_answers for st in train_stats), "sources": files}
    if eval_data is not None:
        eval_stats = LoadStats()
        eval_raw = _read(cfg, eval_data, eval_stats, cache_dir, check, held_out=True)
        stats["bad_records_skipped"] += eval_stats.skipped
        stats["empty_answers_skipped"] += eval_stats.empty_answers
        parts = [(raw, None) for raw in raws]
    else:
        parts = [_hold_out(cfg, raw, f" of the source {name}" if mixing else "") for raw, name in zip(raws, names,
                                                                                                   strict=True)]
    if mixing:
        train_raw, mixed_eval, stats["mix"] = mix_sources(cfg, names, [t for t, _ in parts], [e for _, e in parts],
                                                          [st.records for st in train_stats])
        stats["train_mix_repeats"] = sum(r["train_repeats"] for r in stats["mix"])
        eval_raw = eval_raw if eval_data is not None else mixed_eval
    else:
        train_raw = parts[0][0]
        eval_raw = eval_raw if eval_data is not None else parts[0][1]
    samples = [s for raw in (eval_raw.select(range(min(len(eval_raw), cfg.num_sample_generations)))["record"]
                             if eval_raw is not None and cfg.num_sample_generations else [])
               if (s := _split_sample(json.loads(raw)))]
    train_ds, eval_ds = _tokenize(cfg, train_raw, eval_raw, tokenizer, template, seq2seq)
    train_counts = _token_stats(train_ds, "train")
    eval_counts = _token_stats(eval_ds, "eval") if eval_ds is not None else {}
    if eval_ds is not None:
        stats["eval_prompts_in_train"] = _shared_prompts(eval_counts.pop(KEYS), train_counts[KEYS])
        # What the eval loss is measured on, by content: the promotion gate compares eval losses only over the same
        # records (a description of how they were chosen would miss a change in the choosing).
        stats["eval_records_sha256"] = records_sha256(eval_ds)
    train_counts.pop(KEYS)
    stats.update({"train_records": len(train_ds), "eval_records": len(eval_ds) if eval_ds is not None else 0,
                  **train_counts, **{k: v for k, v in eval_counts.items() if k.startswith("eval_")},
                  "longest_record_tokens": max(train_counts["longest_record_tokens"],
                                               eval_counts.get("longest_record_tokens", 0))})
    counting = ["full_tokens", "full_loss_tokens", "prompt_key"]
    train_ds = train_ds.remove_columns(counting)
    eval_ds = eval_ds.remove_columns(counting) if eval_ds is not None else None
    if fresh_cache or stats["train_records_read"]:
        log.info("data: %s", json.dumps(stats))
    else:  # the generator did not run: every split came from the caches local rank 0 built
        log.info("data: reused the Arrow caches in %s (%d train, %d eval records)", cache_dir,
                 stats["train_records"], stats["eval_records"])
    check_loss_tokens(stats, cfg.max_seq_length, cfg.assistant_only_loss)
    if enforce_limits:
        check_data_limits(stats, cfg.max_seq_length, cfg.max_truncated_fraction, cfg.max_duplicate_fraction,
                          cfg.data_weights, cfg.data_mix_stopping)
    if stats.get("eval_prompts_in_train"):
        # The split keeps records apart, not their copies: a record in two sources of a mix (or twice in one source, or
        # in QLORA_EVAL_DATA and the training data) can be held out once and trained on once.
        log.warning("%d of the %d eval records repeat the prompt of a training record (the same record in two"
                    " sources, or copied in the data): the eval loss and the held-out answers partly measure training"
                    " data; remove the copies (python -m entrypoints.data URI --report counts the duplicates)",
                    stats["eval_prompts_in_train"], stats["eval_records"])
    if eval_ds is not None and stats["eval_loss_tokens"] == 0:
        log.warning("no eval record has an answer token within max_seq_length=%d: the eval loss is skipped",
                    cfg.max_seq_length)
        eval_ds = None
    return TokenizedData(train_ds, eval_ds, samples, stats)


MIX_COLUMN = "mix_source"  # which source a record came from: the index in `data`, counted after mixing, then dropped


def mix_sources(cfg: JobConfig, names: list[str], trains: list[Any], evals: list[Any | None], read: list[int]
                ) -> tuple[Any, Any | None, list[dict[str, Any]]]:
    """The training records of several sources mixed into one set, the held-out records mixed alike, and what each
    source gave: with `data_weights`, `datasets.interleave_datasets` draws each next record from a source chosen with
    those probabilities (seeded by `seed`) out of that source's records shuffled by `seed`, until
    `data_mix_stopping`; without weights every record of every source, once. The held-out records were split off each
    source before mixing, so no record is both trained on and held out, even when a mix repeats records; the held-out
    set itself never repeats a record (an eval loss over copies of one record would weigh it many times): under
    `all_exhausted` it holds every held-out record once. Each source's `train_repeats` counts the records drawn again
    after all of its records were drawn (`all_exhausted` only): the mix's own repeats, which the duplicate limit
    (check_data_limits) leaves out."""
    from datasets import concatenate_datasets, interleave_datasets

    weights = cfg.data_mix_weights

    def mix(parts: list[Any], probabilities: list[float] | None, stopping: str) -> Any:
        if probabilities is None:
            return concatenate_datasets(parts)
        # Shuffled first, each source by a seed of its own: a mix that ends before a source is used up draws a random
        # sample of it, not its first files.
        shuffled = [part.shuffle(seed=cfg.seed + i) for i, part in enumerate(parts)]
        if stopping == "once":  # every record once, in a seeded order
            return concatenate_datasets(shuffled).shuffle(seed=cfg.seed)
        return interleave_datasets(shuffled, probabilities=probabilities, seed=cfg.seed, stopping_strategy=stopping)

    train = mix(trains, weights, cfg.data_mix_stopping)
    held = [(i, e) for i, e in enumerate(evals) if e is not None]
    eval_mix = None
    if held:
        chosen = [weights[i] for i, _ in held] if weights else None
        eval_mix = mix([e for _, e in held], [w / sum(chosen) for w in chosen] if chosen else None,
                       "first_exhausted" if cfg.data_mix_stopping == "first_exhausted" else "once")
    train_counts = _count_sources(train, len(names))
    eval_counts = _count_sources(eval_mix, len(names)) if eval_mix is not None else [0] * len(names)
    total = max(len(train), 1)
    report = [{"source": name, "weight": round(weights[i], 6) if weights else None, "records_read": read[i],
               "train_records": train_counts[i], "train_share": round(train_counts[i] / total, 4),
               "train_repeats": max(0, train_counts[i] - len(trains[i])), "eval_records": eval_counts[i]}
              for i, name in enumerate(names)]

    def described(r: dict[str, Any], available: int) -> str:
        drawn = "" if r["weight"] is None else f" (weight {r['weight']:.3g}, {r['train_share']:.1%} of the mix)"
        again = (f", its {available} training records drawn {r['train_records'] / available:.1f} times each on"
                 " average" if r["train_repeats"] else "")
        return f"{r['source']}: {r['train_records']} of {r['records_read']} read{drawn}{again}"

    log.info("data mix (%s): %s", f"weights, until {cfg.data_mix_stopping}, seed {cfg.seed}" if weights else
             "every record of every source", "; ".join(described(r, len(t)) for r, t in zip(report, trains,
                                                                                             strict=True)))
    if weights:
        _warn_about_mix(cfg, report, [len(t) for t in trains], len(train))
    return (train.remove_columns(MIX_COLUMN),
            eval_mix.remove_columns(MIX_COLUMN) if eval_mix is not None else None, report)


MIX_REPEAT_WARNING = 10  # drawn more often than this on average, a source's records get a warning of their own


def _warn_about_mix(cfg: JobConfig, report: list[dict[str, Any]], available: list[int], drawn: int) -> None:
    """A weighted mix that leaves most records untrained (first_exhausted) or repeats a source many times
    (all_exhausted) does what the settings say, but rarely what was meant: a warning names the source and the lever."""
    stopping = env_name("data_mix_stopping")
    if cfg.data_mix_stopping == "first_exhausted" and drawn < sum(available) / 2:
        ended = [r["source"] for r, n in zip(report, available, strict=True) if r["train_records"] >= n]
        log.warning("the mix trains on %d of the %d records held for training: it ended when %s had given all of its"
                    " records (%s=first_exhausted). Give %s a lower weight, or set %s=all_exhausted to draw every"
                    " record (repeating the smaller sources)", drawn, sum(available), " and ".join(ended) or "a source",
                    stopping, "it" if len(ended) == 1 else "them", stopping)
    for r, n in zip(report, available, strict=True):
        if r["train_records"] > MIX_REPEAT_WARNING * n:
            log.warning("the mix draws %s's %d training record(s) %d times (about %.0f times each, %s=all_exhausted):"
                        " it would be trained on much more often than the other sources' records. Give it a lower"
                        " weight or more records, or set %s=first_exhausted", r["source"], n, r["train_records"],
                        r["train_records"] / n, stopping, stopping)


def check_mix(mix: list[dict[str, Any]], data_weights: str, mix_stopping: str) -> None:
    """Fail when a weighted mix drew no training record from one of its sources: the run would train on other data
    than the settings name (the mix ended, on `first_exhausted`, before that source's turn came)."""
    empty = [r for r in mix if r["weight"] is not None and r["train_records"] == 0]
    if not empty:
        return
    drawn = sum(r["train_records"] for r in mix)
    # The source that ended a first_exhausted mix: the fewest records for its weight (held-out records aside).
    first = min((r for r in mix if r["weight"]), key=lambda r: r["records_read"] / r["weight"])
    names = ", ".join(f"{r['source']} (weight {r['weight']:.3g}, {r['records_read']:,} records read)" for r in empty)
    raise DataError(f"{env_name('data_weights')}={data_weights!r}: the mix drew no training record from {names}: it"
                    f" ended after {drawn:,} record(s), when {first['source']} ({first['records_read']:,} records read,"
                    f" weight {first['weight']:.3g}) had given all of its records"
                    f" ({env_name('data_mix_stopping')}={mix_stopping}), so the run would train on other data than"
                    " the settings name. Give the sources weights in proportion to their records, more records to"
                    f" {first['source']}, or set {env_name('data_mix_stopping')}=all_exhausted")


def _count_sources(ds: Any, n: int) -> list[int]:
    """Records per source in a mix, from its source column (batched: a mix of millions stays a few MB)."""
    import numpy as np

    counts = np.zeros(n, dtype=np.int64)
    for batch in ds.select_columns([MIX_COLUMN]).with_format("arrow").iter(batch_size=100_000):
        counts += np.bincount(batch[MIX_COLUMN].to_numpy(zero_copy_only=False), minlength=n)[:n]
    return [int(c) for c in counts]


def _sources(path: Path, stats: LoadStats) -> list[dict[str, Any]]:
    """Records read and skipped per file, named relative to the data setting's root (a download's local directory
    means nothing to the reader of a report)."""
    root = path.parent if path.is_file() else path
    return [{"file": Path(f.file).relative_to(root).as_posix(), "type": f.type, "format": f.fmt, "records": f.records,
             "skipped": f.skipped} for f in stats.files]


def template_check(tokenizer: Any, template: str | None):
    """A template may refuse a conversation (Mistral's refuses system turns): that record is a bad record, named by
    its file and line and counted against the bad-record budget, not a crash in tokenization."""
    from entrypoints.templating import render

    def renders(conv: list[dict[str, str]] | str) -> None:
        if isinstance(conv, str) or template is None:
            return
        try:
            render(tokenizer, template, conv)
        except Exception as exc:  # noqa: BLE001 - jinja2's TemplateError and the template's own raise_exception
            raise RecordError(f"the chat template refuses this conversation ({type(exc).__name__}: {exc})") from None

    return renders


def _seq2seq_check(conv: list[dict[str, str]] | str) -> None:
    """What an encoder-decoder model cannot train on is a bad record, named by its file and line."""
    if isinstance(conv, str):
        raise RecordError("a plain `text` record has no prompt and answer: an encoder-decoder model is trained on"
                          " (input, target) pairs; give chat or instruction records (messages, alpaca,"
                          " prompt_completion...)")
    last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
    if conv[last].get("weight", 1) == 0:
        raise RecordError("the last answer has weight 0: an encoder-decoder model is trained on the last answer of"
                          " a conversation only, so nothing of this one would be trained on")


def _read(cfg: JobConfig, path: Path, stats: LoadStats, cache_dir: Path, check: Any, held_out: bool,
          mix_source: int | None = None) -> Any:
    """The normalised records of `path` as an Arrow-backed Dataset of JSON strings (one column, `record`; with
    `mix_source`, a second column holding it: the source's index in a mix)."""
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError

    def gen():
        started = time.monotonic()
        for n, conv in enumerate(load_conversations(path, cfg.data_format, cfg.max_bad_records, stats,
                                                    held_out=held_out, check=check), start=1):
            if n % PROGRESS_RECORDS == 0:
                log.info("read %d records from %s (%.0f/s)", n, path, n / max(time.monotonic() - started, 1e-9))
            yield {"record": json.dumps(conv)} if mix_source is None else {"record": json.dumps(conv),
                                                                            MIX_COLUMN: mix_source}

    # An explicit fingerprint: `datasets` would otherwise hash the generator's closure (the tokenizer with it),
    # which is slow and differs between processes, so a host's other ranks would read the data again instead of
    # reusing the caches its local rank 0 built. The cache folder is this job's own and is emptied at the start of
    # each run, so what names the read within it is enough.
    key = json.dumps([str(path), held_out, cfg.data_format, cfg.max_bad_records, cfg.chat_template or "", mix_source])
    try:
        return Dataset.from_generator(gen, cache_dir=str(cache_dir), keep_in_memory=False,
                                      fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32])
    except DatasetGenerationError as exc:
        # datasets wraps whatever the generator raised; a bad record is a data error, not a crash.
        if isinstance(exc.__cause__, JobError):
            raise exc.__cause__ from None
        raise


def _hold_out(cfg: JobConfig, records: Any, of: str = "") -> tuple[Any, Any | None]:
    """Split eval_fraction of the records off for eval (none with 0, or with a single record). `of`: which source of
    a mix the records are (" of the source s3://..."), for the messages."""
    if cfg.eval_fraction <= 0:
        return records, None
    if len(records) < 2:
        log.warning("%s=%s: a single training record%s cannot be split; no eval split is held out%s",
                    env_name("eval_fraction"), cfg.eval_fraction, of, " from it" if of else "")
        return records, None
    n_eval = max(1, round(len(records) * cfg.eval_fraction))
    if len(records) - n_eval < 1:
        raise ConfigError([f"{env_name('eval_fraction')}={cfg.eval_fraction} holds out {n_eval} of the"
                           f" {len(records)} training record(s){of}, leaving none to train on: lower it, set it to"
                           f" 0 (no eval), or give held-out data in {env_name('eval_data')}"])
    split = records.train_test_split(test_size=n_eval, seed=cfg.seed, shuffle=True)
    return split["train"], split["test"]


def _tokenize(cfg: JobConfig, train_raw: Any, eval_raw: Any | None, tokenizer: Any, template: str | None,
              seq2seq: bool = False) -> tuple[Any, Any | None]:
    """Token ids and loss masks (seq2seq: input and target ids), truncated here to max_seq_length (keeping the
    start; seq2seq: the input and the target each) so that what is counted is what is trained on; the full lengths
    and answer-token counts are kept to report what truncation removed."""
    from entrypoints.templating import encode_record, tokenize_seq2seq

    seq = cfg.max_seq_length

    def tokenize_pairs(batch):
        out: dict[str, list] = {"input_ids": [], "labels": [], "full_tokens": [], "full_loss_tokens": [],
                                "prompt_key": []}
        for raw in batch["record"]:
            conv = json.loads(raw)
            out["prompt_key"].append(prompt_key(conv))
            enc = tokenize_seq2seq(tokenizer, conv)
            out["full_tokens"].append(len(enc["input_ids"]) + len(enc["labels"]))
            out["full_loss_tokens"].append(len(enc["labels"]))
            out["input_ids"].append(enc["input_ids"][:seq])
            out["labels"].append(enc["labels"][:seq])
        return out

    def tokenize(batch):
        out: dict[str, list] = {"input_ids": [], "assistant_masks": [], "full_tokens": [], "full_loss_tokens": [],
                                "prompt_key": []}
        for raw in batch["record"]:
            conv = json.loads(raw)
            out["prompt_key"].append(prompt_key(conv))
            enc = encode_record(tokenizer, template, conv, cfg.assistant_only_loss, cfg.max_seq_length)
            for key in ("input_ids", "assistant_masks", "full_tokens", "full_loss_tokens"):
                out[key].append(enc[key])
        return out

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    num_proc = min(cores, 8) if len(train_raw) > 20_000 and cores > 1 else None
    started = time.monotonic()
    log.info("tokenizing %d train and %d eval records%s", len(train_raw), len(eval_raw) if eval_raw is not None else 0,
             f" on {num_proc} processes" if num_proc else "")
    function = tokenize_pairs if seq2seq else tokenize
    train_ds = train_raw.map(function, batched=True, remove_columns=["record"], num_proc=num_proc,
                             desc="tokenizing train")
    eval_ds = (eval_raw.map(function, batched=True, remove_columns=["record"], desc="tokenizing eval")
               if eval_raw is not None else None)
    log.info("tokenized in %.1f s", time.monotonic() - started)
    return train_ds, eval_ds


def prompt_key(conv: list[dict[str, Any]] | str) -> int:
    """A 64-bit hash of a record's prompt (everything before its last answer; a `text` record's whole text), to count
    exact duplicates without keeping the prompts."""
    if isinstance(conv, str):
        prompt: Any = conv
    else:
        last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
        prompt = [[m["role"], m["content"]] for m in conv[:last]]
    digest = hashlib.blake2b(json.dumps(prompt, ensure_ascii=False).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def records_sha256(ds: Any) -> str:
    """sha256 of a tokenized split as trained or evaluated on: every record's token ids and its loss positions (the
    answer mask, or a seq2seq target), in order."""
    import hashlib

    import numpy as np
    import pyarrow.compute as pc

    columns = ["input_ids", "labels" if "labels" in ds.column_names else "assistant_masks"]
    digest = hashlib.sha256()
    for batch in ds.select_columns(columns).with_format("arrow").iter(batch_size=1_000):
        for name in columns:
            column = batch[name]
            digest.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
            digest.update(pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    return digest.hexdigest()


def _token_stats(ds: Any, split: str) -> dict[str, Any]:
    """Token counts by batched iteration over the Arrow table (reading whole columns would load them into RAM):
    tokens and answer (loss) tokens as trained on, after truncation, and before it; the lengths' percentiles (before
    truncation) and the records repeating an earlier record's prompt. Seq2seq data (a `labels` column): the tokens
    of input and target, the target's being the loss tokens."""
    import numpy as np
    import pyarrow.compute as pc

    def lengths_of(column) -> Any:
        return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)

    lengths, keys = [], []  # one int32 and one int64 per record: 12 MB per million records
    tokens = loss_tokens = full_loss_tokens = truncated = no_answer = longest = 0
    seq2seq = "labels" in ds.column_names
    columns = ["input_ids", "labels" if seq2seq else "assistant_masks", "full_tokens", "full_loss_tokens", "prompt_key"]
    # Batches of 1,000 records: the per-record sums below make numpy copies of a batch's masks (8 bytes a token).
    for batch in ds.select_columns(columns).with_format("arrow").iter(batch_size=1_000):
        kept = lengths_of(batch["input_ids"])
        full = batch["full_tokens"].to_numpy(zero_copy_only=False).astype(np.int64)
        if seq2seq:
            per_record_loss = lengths_of(batch["labels"])
            kept = kept + per_record_loss
        else:
            # Answer tokens per record: differences of the running sum of the flattened 0/1 masks at list boundaries.
            masks = batch["assistant_masks"]
            running = np.concatenate([[0], np.cumsum(pc.list_flatten(masks).to_numpy(zero_copy_only=False))])
            ends = np.cumsum(lengths_of(masks))
            per_record_loss = running[ends] - running[np.concatenate([[0], ends[:-1]])]
        lengths.append(full.astype(np.int32))
        keys.append(batch["prompt_key"].to_numpy(zero_copy_only=False))
        tokens += int(kept.sum())
        loss_tokens += int(per_record_loss.sum())
        full_loss_tokens += int(pc.sum(batch["full_loss_tokens"]).as_py() or 0)
        truncated += int((full > kept).sum())
        no_answer += int((per_record_loss == 0).sum())
        longest = max(longest, int(kept.max()) if len(kept) else 0)
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int32)
    all_keys = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
    percentiles = ({f"p{q}": int(v) for q, v in zip((50, 90, 99), np.percentile(all_lengths, (50, 90, 99),
                                                                                 method="higher"), strict=True)}
                   | {"max": int(all_lengths.max())}) if len(all_lengths) else {}
    return {f"{split}_tokens": tokens, f"{split}_loss_tokens": loss_tokens,
            f"{split}_loss_tokens_before_truncation": full_loss_tokens,
            f"{split}_loss_tokens_truncated": full_loss_tokens - loss_tokens,
            f"{split}_records_truncated": truncated, f"{split}_records_without_answer_tokens": no_answer,
            f"{split}_record_tokens_before_truncation": percentiles,
            f"{split}_duplicate_prompts": int(len(all_keys) - len(np.unique(all_keys))),
            "median_tokens_per_record": int(np.sort(all_lengths)[len(all_lengths) // 2]) if len(all_lengths) else 0,
            "longest_record_tokens": longest, KEYS: all_keys}


KEYS = "_prompt_keys"  # in _token_stats' result: every record's prompt hash, for _shared_prompts (not reported)


def _shared_prompts(eval_keys: Any, train_keys: Any) -> int:
    """How many eval records have the prompt of a training record."""
    import numpy as np

    return int(np.isin(eval_keys, train_keys).sum())


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


def check_data_limits(stats: dict[str, Any], max_seq_length: int, max_truncated: float, max_duplicates: float,
                      data_weights: str = "", mix_stopping: str = "first_exhausted") -> None:
    """Fail before any GPU time when more training records than the limits allow are cut by max_seq_length or
    repeat an earlier record's prompt, or when a weighted mix drew nothing from a source: each means the data or the
    settings are not what was meant. The records a mix repeats by design (`all_exhausted`) are not duplicates of the
    data: they are left out of the duplicate count."""
    if stats.get("mix"):
        check_mix(stats["mix"], data_weights, mix_stopping)
    records = stats["train_records"]
    repeats = stats.get("train_mix_repeats", 0)
    truncated, duplicates = stats["train_records_truncated"], stats["train_duplicate_prompts"] - repeats
    if records and truncated / records > max_truncated:
        lengths = stats["train_record_tokens_before_truncation"]
        raise DataError(f"{truncated:,} of the {records:,} training records ({truncated / records:.0%}) are longer"
                        f" than {env_name('max_seq_length')}={max_seq_length} tokens and would be cut (their lengths:"
                        f" median {lengths.get('p50')}, 90th percentile {lengths.get('p90')}, longest"
                        f" {lengths.get('max')}), over {env_name('max_truncated_fraction')}={max_truncated}. Raise"
                        f" {env_name('max_seq_length')}, shorten or drop the long records, or raise"
                        f" {env_name('max_truncated_fraction')} if cutting them is intended")
    if records and duplicates / records > max_duplicates:
        mixed = f" (besides the {repeats:,} repeats the mix draws by design)" if repeats else ""
        raise DataError(f"{duplicates:,} of the {records:,} training records ({duplicates / records:.0%}) repeat the"
                        f" prompt of an earlier record exactly{mixed}, over {env_name('max_duplicate_fraction')}="
                        f"{max_duplicates}: the data was probably copied twice or merged with itself. Remove the"
                        " duplicates (python -m entrypoints.data URI --report counts them), or raise"
                        f" {env_name('max_duplicate_fraction')} if repeating them is intended")
