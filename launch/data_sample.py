"""The training tokens of a job, estimated from a sample of its S3 data, for the launcher's time and cost estimate.

    python launch/submit.py --instance g5.2xlarge --set data=s3://b/data/chat/ --dry-run   # prints the estimate's basis

Per data source: list the objects the job would read (its own rules: entrypoints.data), read the first SAMPLE_BYTES
of up to SAMPLE_OBJECTS of them (ranged GETs: first, middle and last by key), parse and normalise the records with
the job's reader, and count their tokens as the job does (entrypoints.templating: the model's tokenizer and chat
template, cut at max_seq_length), then extrapolate by the bytes of every data object. The tokens are counted in a
child process in which torch cannot be imported (the launcher never imports torch; transformers loads a tokenizer
without it); where that cannot run (no transformers, no tokenizer files), characters / CHARS_PER_TOKEN stands in,
and the basis says so. A mix is sized as the job draws it (data_weights, data_mix_stopping), less eval_fraction.

Never raises: whatever goes wrong (no credentials, access denied, a file type that cannot be sampled) is a one-line
note and no estimate.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from entrypoints.config import JobConfig
from entrypoints.data import LoadStats, file_type, load_conversations
from entrypoints.errors import DataError

SAMPLE_BYTES = 2 * 2**20  # read from the start of each sampled object
SAMPLE_OBJECTS = 3  # per source
MAX_LISTED_OBJECTS = 100_000  # per source; the bytes of more are not counted (the estimate says so)
# Used when no tokenizer can be loaded: characters per token of English chat text with a Llama-class tokenizer (the
# Llama 2 tokenizer gives 3.5 on the texts of the demo's data, entrypoints/demo/data/train.jsonl), plus the chat
# template's own tokens per turn (role markers, BOS/EOS: about 4 in the Llama 2 chat format).
CHARS_PER_TOKEN = 3.5
TEMPLATE_TOKENS_PER_TURN = 4
TOKENIZER_TIMEOUT_SECONDS = 120


@dataclass(frozen=True)
class ObjectSample:
    key: str
    size: int
    used_bytes: int  # of the object's bytes, how many the sampled records came from (compressed bytes, if it is)
    records: int
    tokens: int  # the records' tokens as trained on (cut at max_seq_length)


@dataclass(frozen=True)
class SourceSample:
    uri: str
    objects: list[tuple[str, int]]  # (key, size) of every data object the job would read
    samples: list[ObjectSample]  # of the sampled objects, those with records

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.objects)

    def _estimate(self, what: str) -> float:
        """Each sampled object by its own density (per byte), the others by that of the sampled objects of the same
        compression (a compressed byte holds several plain ones), else of all sampled objects."""
        sampled = {s.key: s for s in self.samples}

        def density(kind: str) -> float:
            alike = [s for s in self.samples if _compression(s.key) == kind] or self.samples
            return sum(getattr(s, what) for s in alike) / max(sum(s.used_bytes for s in alike), 1)

        return sum(getattr(sampled[key], what) * size / max(sampled[key].used_bytes, 1) if key in sampled
                   else size * density(_compression(key)) for key, size in self.objects)

    @property
    def estimated_records(self) -> float:
        return self._estimate("records")

    @property
    def estimated_tokens(self) -> float:
        return self._estimate("tokens")

    @property
    def records(self) -> int:
        return sum(s.records for s in self.samples)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)


def _compression(key: str) -> str:
    return (file_type(key.rsplit("/", 1)[-1]) or ("", ""))[1]


@dataclass(frozen=True)
class TokenEstimate:
    tokens: int | None  # training tokens of one epoch; None: no estimate (`basis` says why)
    basis: str


def estimate_training_tokens(cfg: JobConfig) -> TokenEstimate:
    """The training tokens of one epoch of `cfg`'s data, from a sample; never raises."""
    try:
        with tempfile.TemporaryDirectory(prefix="qlora-sample-") as tmp:
            return _estimate(cfg, Path(tmp))
    except Exception as exc:  # noqa: BLE001 - an estimate must never stop a submission
        return TokenEstimate(None, f"the data could not be sampled ({type(exc).__name__}: {_first_line(exc)}): no"
                                   " estimate from the data (give --dataset-tokens N)")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def _estimate(cfg: JobConfig, tmp: Path) -> TokenEstimate:
    client = _client(cfg.s3_endpoint_url)
    listed: list[tuple[str, list[tuple[str, int]], list[tuple[str, int, int, list[Any]]]]] = []
    for i, uri in enumerate(cfg.data_sources):
        objects = _data_objects(client, uri)
        if not objects:
            return TokenEstimate(None, f"nothing to sample at {uri} (no data objects): no estimate from the data")
        empty = [key for key, size in objects if size == 0]
        if empty:  # the job refuses an empty data file (exit 3): said here, before any instance is paid for
            bucket, _ = _split(uri)
            shown = ", ".join(f"s3://{bucket}/{key}" for key in empty[:3]) + (" ..." if len(empty) > 3 else "")
            return TokenEstimate(None, f"{len(empty)} data object(s) at {uri} are empty ({shown}): the job fails on an"
                                       " empty data file (exit 3); remove them. No estimate from the data")
        sampled = _sample_source(client, uri, objects, tmp / f"source-{i}", cfg)
        if not sampled:
            return TokenEstimate(None, f"no record could be read from the first {SAMPLE_BYTES // 2**20} MiB of the"
                                       f" sampled object(s) of {uri} (a Parquet or .json file larger than that is not"
                                       " sampled): no estimate from the data")
        listed.append((uri, objects, sampled))
    counts, how = count_tokens(cfg, [records for _, _, sampled in listed for *_, records in sampled], tmp)
    sources, n = [], 0
    for uri, objects, sampled in listed:
        samples = []
        for key, size, used, records in sampled:
            samples.append(ObjectSample(key, size, used, len(records), sum(counts[n])))
            n += 1
        sources.append(SourceSample(uri, objects, samples))
    tokens = mixed_tokens(cfg, sources)
    detail = "; ".join(f"{s.uri}: {s.records} records, {s.tokens} tokens in"
                       f" {sum(x.used_bytes for x in s.samples) / 2**20:.2f} MiB of {len(s.samples)} of"
                       f" {len(s.objects)} object(s), {s.total_bytes / 2**20:.2f} MiB in all"
                       f"{' (listing capped)' if len(s.objects) >= MAX_LISTED_OBJECTS else ''}" for s in sources)
    held = "" if cfg.eval_data else f", less eval_fraction={cfg.eval_fraction:g}"
    mix = ""
    if len(sources) > 1:
        mix = (f", mixed by data_weights until {cfg.data_mix_stopping}" if cfg.data_mix_weights else
               ", every source's records")
    return TokenEstimate(int(tokens), f"~{int(tokens):,} training tokens per epoch estimated from a sample ({detail};"
                                      f" tokens {how}; extrapolated by object bytes{mix}{held})")


def mixed_tokens(cfg: JobConfig, sources: list[SourceSample]) -> float:
    """The tokens of one epoch: every source's (without weights), or the weighted mix as long as the job draws it
    (until the first or the last source is used up: datasets.interleave_datasets' stopping strategies); the records
    held out for eval (eval_fraction of each source) are not trained on."""
    kept = 1.0 if cfg.eval_data else 1.0 - cfg.eval_fraction
    weights = cfg.data_mix_weights
    if len(sources) == 1 or not weights:
        return kept * sum(s.estimated_tokens for s in sources)
    lasts = [s.estimated_records * kept / w for s, w in zip(sources, weights, strict=True)]
    length = min(lasts) if cfg.data_mix_stopping == "first_exhausted" else max(lasts)
    return sum(length * w * s.tokens / max(s.records, 1) for s, w in zip(sources, weights, strict=True))


def _client(endpoint_url: str) -> Any:
    import boto3
    from botocore.config import Config

    # Short timeouts and one retry: a submission waits for this, and an unreachable store only costs the estimate.
    config = Config(connect_timeout=5, read_timeout=20, retries={"max_attempts": 2, "mode": "standard"},
                    s3={"addressing_style": "path"} if endpoint_url else {})
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def _data_objects(client: Any, uri: str) -> list[tuple[str, int]]:
    """(key, size) of the data objects the job reads at `uri`: every object below `<uri>/`, or when there is none, the
    one object `<uri>`; files that are not data are skipped as the job skips them."""
    from entrypoints.data import _not_data

    bucket, key = _split(uri)
    prefix = key if key.endswith("/") or not key else key + "/"
    found = _list(client, bucket, prefix)
    if not found and not key.endswith("/"):
        found = [(k, size) for k, size in _list(client, bucket, key) if k == key]
        prefix = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
    return [(k, size) for k, size in found
            if not _not_data(PurePosixPath(k[len(prefix):])) and file_type(k.rsplit("/", 1)[-1]) is not None]


def _list(client: Any, bucket: str, prefix: str) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [(o["Key"], o["Size"]) for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        if len(out) >= MAX_LISTED_OBJECTS:
            break
    return sorted(out)


def _sample_source(client: Any, uri: str, objects: list[tuple[str, int]], dest: Path, cfg: JobConfig
                   ) -> list[tuple[str, int, int, list[Any]]]:
    """(key, size, object bytes used, normalised records) of each sampled object that gave records."""
    bucket, _ = _split(uri)
    out = []
    for n, index in enumerate(sorted({0, len(objects) // 2, len(objects) - 1})[:SAMPLE_OBJECTS]):
        key, size = objects[index]
        body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{SAMPLE_BYTES - 1}")["Body"].read()
        folder = dest / str(n)
        used = _usable_part(key, body, complete=len(body) >= size, dest=folder)
        if used is None:
            continue
        # The cut at the sample's end may leave one damaged record: skipped, not a failure.
        try:
            records = list(load_conversations(folder, cfg.data_format, max_bad_records=10**9, stats=LoadStats(),
                                              held_out=True))
        except DataError as exc:  # named by the object, not by the scratch folder it was sampled into
            text = str(exc)
            for path in [*folder.iterdir(), folder]:
                text = text.replace(str(path), f"s3://{bucket}/{key}")
            raise DataError(text) from None
        if records:
            out.append((key, size, used, records))
    return out


def _usable_part(key: str, body: bytes, complete: bool, dest: Path) -> int | None:
    """Write what the job's reader can parse of an object's first bytes to `dest`/<name>; the object bytes it stands
    for, or None when nothing of it can be read (a Parquet or .json file needs its whole bytes)."""
    from entrypoints.data import DataFile, _open, _stream_errors

    name = key.rsplit("/", 1)[-1]
    layout, compression = file_type(name) or ("", "")
    dest.mkdir(parents=True)
    if complete:
        (dest / name).write_bytes(body)
        return len(body)
    if layout in ("parquet", "json"):
        return None
    text = body
    if compression:  # decompress as much as the cut allows
        partial = dest / f".{name}"
        partial.write_bytes(body)
        pieces = []
        try:
            with _open(DataFile(partial, layout, compression)) as stream:
                while chunk := stream.read(1 << 20):
                    pieces.append(chunk)
        except _stream_errors():
            pass
        partial.unlink()
        text = b"".join(pieces)
        name = name[: name.lower().rindex(".")]  # the decompressed file
    cut = text.rfind(b"\n")
    if cut < 0:
        return None
    (dest / name).write_bytes(text[:cut + 1])
    return len(body) if compression else cut + 1


def count_tokens(cfg: JobConfig, conversations: list[list[Any]], tmp: Path) -> tuple[list[list[int]], str]:
    """Tokens per record of each source as trained on (cut at max_seq_length), and how they were counted."""
    records = tmp / "records.json"
    records.write_text(json.dumps({"settings": {k: str(v) for k, v in cfg.to_public_dict().items()},
                                   "sources": conversations}), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run([sys.executable, "-m", "launch.data_sample", str(records), str(tmp / "tokenizer")],
                              capture_output=True, text=True, timeout=TOKENIZER_TIMEOUT_SECONDS, env=env)
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1]), f"with {cfg.model}'s tokenizer and chat template"
        why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:200]
    except (subprocess.TimeoutExpired, OSError, ValueError) as exc:
        why = f"{type(exc).__name__}: {_first_line(exc)}"
    counted = [[min(cfg.max_seq_length, _rough_tokens(c)) for c in source] for source in conversations]
    return counted, (f"as characters / {CHARS_PER_TOKEN:g} + {TEMPLATE_TOKENS_PER_TURN} per turn (a typical ratio for"
                     f" English with Llama-class tokenizers), since {cfg.model}'s tokenizer could not be loaded here:"
                     f" {why}")


def _rough_tokens(conversation: Any) -> int:
    if isinstance(conversation, str):
        return math.ceil(len(conversation) / CHARS_PER_TOKEN)
    return sum(math.ceil(len(m["content"]) / CHARS_PER_TOKEN) + TEMPLATE_TOKENS_PER_TURN for m in conversation)


def _count_in_child(records_file: Path, tokenizer_dir: Path) -> list[list[int]]:
    """In the child process: the job's tokenizer, chat template and encoding of every sampled record."""
    sys.modules["torch"] = None  # type: ignore[assignment]  # transformers then works without it, as on a laptop
    from entrypoints.config import JobConfig as Config
    from entrypoints.config import parse_config
    from entrypoints.modeling import fetch_tokenizer
    from entrypoints.templating import encode_record, load_tokenizer_and_template

    given = json.loads(records_file.read_text(encoding="utf-8"))
    names = {f.name for f in Config.__dataclass_fields__.values()}
    cfg = parse_config({f"QLORA_{k.upper()}": v for k, v in given["settings"].items() if k in names},
                       check_paths=False)
    directory = fetch_tokenizer(cfg.model, cfg.model_revision, tokenizer_dir, cfg.s3_endpoint_url)
    tokenizer, template = load_tokenizer_and_template(cfg, directory)
    return [[len(encode_record(tokenizer, template, record, cfg.assistant_only_loss, cfg.max_seq_length)["input_ids"])
             for record in source] for source in given["sources"]]


if __name__ == "__main__":
    try:
        print(json.dumps(_count_in_child(Path(sys.argv[1]), Path(sys.argv[2]))))
    except Exception as exc:  # noqa: BLE001 - the parent falls back to characters per token and says why
        print(f"{type(exc).__name__}: {_first_line(exc)}", file=sys.stderr)
        sys.exit(1)
