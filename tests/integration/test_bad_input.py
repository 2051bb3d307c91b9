"""Bad input, table-driven: every case runs the job's real `main()` and must fail with one clear paragraph.

    PYTHONPATH=$PWD python -m pytest tests/integration/test_bad_input.py

Each case sets up a real input (settings, files, a model directory, an S3 prefix on the test server) and
checks: the documented exit code, a message naming the source (the variable, file:line or URI) and the fix,
the same message as the last log line and in the SageMaker failure file, and no traceback. `main()` runs
in-process (the subprocess path, the same code, is covered by tests/integration/test_job.py) so the 40-odd cases stay fast.
"""

from __future__ import annotations

import gzip
import json
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from entrypoints import train
from entrypoints.data import FORMATS, load_conversations
from entrypoints.demo.assets import smollm2, tiny_llama2
from entrypoints.errors import EXIT_CONFIG, EXIT_DATA, EXIT_MODEL, EXIT_OUTPUT_EXISTS, EXIT_STORAGE, DataError

GOOD = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]}


@dataclass
class Ctx:
    tmp: Path
    model: Path
    smol: Path
    bucket: str
    endpoint: str
    s3: object

    def data(self, name: str, text: str | bytes) -> str:
        path = self.tmp / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(path)

    def jsonl(self, *records) -> str:
        return self.data("train.jsonl", "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))

    def model_copy(self, drop: tuple[str, ...] = (), add: dict[str, bytes] | None = None, source: Path | None = None) -> str:
        target = self.tmp / "model-copy"
        shutil.copytree(source or self.model, target, ignore=shutil.ignore_patterns(*drop))
        for name, content in (add or {}).items():
            (target / name).write_bytes(content)
        return str(target)


@dataclass
class Case:
    name: str
    code: int
    setup: Callable[[Ctx], dict[str, str]]  # -> QLORA_* settings (and other variables) for the case
    names: tuple[str, ...]  # the message must name the source ...
    fix: str  # ... and say how to fix it (a phrase of the advice)
    argv: tuple[str, ...] = ()


def damaged_model(c: Ctx, edit: Callable[[dict, dict], None] | None = None, truncate: bool = False,
                  config: dict | None = None, extra: dict[str, str] | None = None) -> str:
    """A copy of the tiny model with its weights edited (`edit(tensors, metadata)`), cut short, its config.json
    updated, or extra files added."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    target = Path(c.model_copy())
    weights = target / "model.safetensors"
    if edit is not None:
        with safe_open(str(weights), "pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        edit(tensors, metadata)
        save_file(tensors, str(weights), metadata=metadata)
    if truncate:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 2 // 3])
    if config:
        cfg = json.loads((target / "config.json").read_text())
        cfg.update(config)
        (target / "config.json").write_text(json.dumps(cfg))
    for name, text in (extra or {}).items():
        (target / name).write_text(text)
    return str(target)


def template_refuses_system(c: Ctx) -> dict[str, str]:
    """The tiny model with a chat template that raises on system turns (as Mistral's does), and data with one."""
    model = Path(damaged_model(c))
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}"
                               "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    record = {"messages": [{"role": "system", "content": "Be brief."}, *GOOD["messages"]]}
    return {"QLORA_MODEL": str(model), "QLORA_DATA": c.jsonl(record, GOOD)}


def long_prompts(c: Ctx) -> str:
    """Records whose prompt alone is longer than 32 tokens: a max_seq_length of 32 cuts every answer away."""
    record = {"messages": [{"role": "user", "content": "Please read this carefully. " * 20},
                           {"role": "assistant", "content": "Done."}]}
    return c.jsonl(record, record, record)


def qa(i: int, tail: str = "") -> dict:
    return {"messages": [{"role": "user", "content": f"What is {i}+{i}?"},
                         {"role": "assistant", "content": f"{2 * i}.{tail}"}]}


def ok_data(c: Ctx) -> dict[str, str]:
    return {"QLORA_DATA": c.jsonl(GOOD, GOOD)}


def no_template_model(c: Ctx) -> dict[str, str]:
    """SmolLM2 (not a Llama tokenizer) with its chat template removed."""
    target = c.tmp / "smol-no-template"
    target.mkdir()
    for item in c.smol.iterdir():
        if item.name == "chat_template.jinja":
            continue
        if item.name == "tokenizer_config.json":
            config = json.loads(item.read_text())
            config.pop("chat_template", None)
            (target / item.name).write_text(json.dumps(config))
        else:
            (target / item.name).symlink_to(item)
    return {"QLORA_MODEL": str(target), **ok_data(c)}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = [
    # ---------------------------------------------------------------- configuration (exit 2)
    Case("data not set", EXIT_CONFIG, lambda c: {}, ("QLORA_DATA",), "give the training data"),
    Case("integer expected", EXIT_CONFIG, lambda c: {**ok_data(c), "QLORA_MAX_STEPS": "many"},
         ("QLORA_MAX_STEPS='many'",), "expected an integer"),
    Case("unknown variable", EXIT_CONFIG, lambda c: {**ok_data(c), "QLORA_LORA_RANK": "8"},
         ("QLORA_LORA_RANK",), "did you mean QLORA_LORA_R"),
    Case("unknown flag", EXIT_CONFIG, ok_data, ("--lora-rank",), "did you mean --lora-r", argv=("--lora-rank", "8")),
    Case("learning rate out of range", EXIT_CONFIG, lambda c: {**ok_data(c), "QLORA_LEARNING_RATE": "5"},
         ("QLORA_LEARNING_RATE",), "2e-4 is typical"),
    Case("eval fraction out of range", EXIT_CONFIG, lambda c: {**ok_data(c), "QLORA_EVAL_FRACTION": "1.5"},
         ("QLORA_EVAL_FRACTION",), "below 1"),
    Case("choice not offered", EXIT_CONFIG, lambda c: {**ok_data(c), "QLORA_QUANTIZATION": "int3"},
         ("QLORA_QUANTIZATION='int3'",), "expected one of nf4, fp4, none"),
    Case("boolean expected", EXIT_CONFIG, lambda c: {**ok_data(c), "QLORA_MERGE": "maybe"},
         ("QLORA_MERGE='maybe'",), "true/false"),
    Case("foreign URI scheme", EXIT_CONFIG, lambda c: {**ok_data(c), "QLORA_OUTPUT": "gs://bucket/out"},
         ("QLORA_OUTPUT='gs://bucket/out'",), "only s3:// URIs and local paths"),
    Case("checkpoint URI not s3", EXIT_CONFIG, lambda c: {**ok_data(c), "QLORA_CHECKPOINT_URI": "/tmp/ck"},
         ("QLORA_CHECKPOINT_URI",), "must be an s3:// prefix"),
    Case("s3 URI without bucket", EXIT_CONFIG, lambda c: {"QLORA_DATA": "s3://"}, ("QLORA_DATA='s3://'",),
         "needs a bucket"),
    Case("local data missing", EXIT_CONFIG, lambda c: {"QLORA_DATA": str(c.tmp / "nope.jsonl")},
         ("QLORA_DATA", "nope.jsonl"), "no such file or directory"),
    Case("eval data and eval fraction both set", EXIT_CONFIG,
         lambda c: {**ok_data(c), "QLORA_EVAL_DATA": c.data("eval.jsonl", json.dumps(GOOD)),
                    "QLORA_EVAL_FRACTION": "0.2"}, ("QLORA_EVAL_DATA", "QLORA_EVAL_FRACTION"), "use one of them"),
    Case("epochs zero with max_steps -1", EXIT_CONFIG, lambda c: {**ok_data(c), "QLORA_NUM_EPOCHS": "0"},
         ("QLORA_NUM_EPOCHS",), "above 0 when max_steps is -1"),
    Case("lora dropout 1", EXIT_CONFIG, lambda c: {**ok_data(c), "QLORA_LORA_DROPOUT": "1"},
         ("QLORA_LORA_DROPOUT",), "below 1"),
    Case("zero sequence length", EXIT_CONFIG, lambda c: {**ok_data(c), "QLORA_MAX_SEQ_LENGTH": "0"},
         ("QLORA_MAX_SEQ_LENGTH",), "1 or more"),
    Case("hyperparameters.json broken", EXIT_CONFIG,
         lambda c: {**ok_data(c), "_HP": "{not json"}, ("hyperparameters.json",), "fix or remove the file"),
    Case("hyperparameters.json unknown key", EXIT_CONFIG,
         lambda c: {**ok_data(c), "_HP": json.dumps({"lora_rank": 8})}, ("hyperparameters.json", "'lora_rank'"),
         "did you mean lora_r"),
    Case("secrets dir missing", EXIT_CONFIG, lambda c: {**ok_data(c), "QLORA_SECRETS_DIR": str(c.tmp / "nosecrets")},
         ("QLORA_SECRETS_DIR",), "mount the secret there or unset it"),
    # ---------------------------------------------------------------- storage (exit 5)
    Case("data bucket does not exist", EXIT_STORAGE,
         lambda c: {"QLORA_DATA": "s3://no-such-bucket-x1/train.jsonl"}, ("no-such-bucket-x1",), "create it or fix the URI"),
    Case("data prefix is empty", EXIT_STORAGE, lambda c: {"QLORA_DATA": f"s3://{c.bucket}/empty/"},
         ("/empty/",), "the prefix is empty or the key does not exist"),
    Case("output bucket does not exist", EXIT_STORAGE,
         lambda c: {**ok_data(c), "QLORA_OUTPUT": "s3://no-such-bucket-x2/out"}, ("s3://no-such-bucket-x2",),
         "does not exist: create it or fix the URI"),
    Case("endpoint unreachable", EXIT_STORAGE,
         lambda c: {"QLORA_DATA": f"s3://{c.bucket}/d.jsonl", "AWS_MAX_ATTEMPTS": "1",
                    "QLORA_S3_ENDPOINT_URL": f"http://127.0.0.1:{closed_port()}"},
         ("/d.jsonl", "cannot reach the S3 endpoint"), "check QLORA_S3_ENDPOINT_URL"),
    # ---------------------------------------------------------------- data (exit 3)
    Case("empty file", EXIT_DATA, lambda c: {"QLORA_DATA": c.data("train.jsonl", "")}, ("train.jsonl",),
         "remove it or point the data setting elsewhere"),
    Case("invalid JSON line", EXIT_DATA, lambda c: {"QLORA_DATA": c.jsonl(GOOD, '{"messages": [')},
         ("train.jsonl:2",), "QLORA_MAX_BAD_RECORDS"),
    Case("line is not an object", EXIT_DATA, lambda c: {"QLORA_DATA": c.jsonl(GOOD, "[1, 2]")},
         ("train.jsonl:2",), "expected a JSON object per line"),
    Case("wrong schema", EXIT_DATA, lambda c: {"QLORA_DATA": c.jsonl({"question": "q", "answer": "a"})},
         ("train.jsonl:1",), "or set QLORA_DATA_FORMAT"),
    Case("missing assistant turn", EXIT_DATA,
         lambda c: {"QLORA_DATA": c.jsonl(GOOD, {"messages": [{"role": "user", "content": "hi"}]})},
         ("train.jsonl:2",), "needs at least one assistant answer"),
    Case("empty assistant answer", EXIT_DATA,
         lambda c: {"QLORA_DATA": c.jsonl({"messages": [{"role": "user", "content": "q"},
                                                        {"role": "assistant", "content": " "}]})},
         ("train.jsonl:1",), "assistant turn 2 is empty"),
    Case("duplicate roles", EXIT_DATA,
         lambda c: {"QLORA_DATA": c.jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                                        {"role": "assistant", "content": "c"}]})},
         ("train.jsonl:1",), "merge duplicate roles into one turn"),
    Case("unknown role", EXIT_DATA,
         lambda c: {"QLORA_DATA": c.jsonl({"messages": [{"role": "narrator", "content": "a"},
                                                        {"role": "assistant", "content": "c"}]})},
         ("train.jsonl:1", "'narrator'"), "system, user, assistant"),
    Case("system message not first", EXIT_DATA,
         lambda c: {"QLORA_DATA": c.jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                                                        {"role": "assistant", "content": "c"}]})},
         ("train.jsonl:1",), "may only come first"),
    Case("content not a string", EXIT_DATA,
         lambda c: {"QLORA_DATA": c.jsonl({"messages": [{"role": "user", "content": 5},
                                                        {"role": "assistant", "content": "c"}]})},
         ("train.jsonl:1", "messages[0].content"), "must be a string"),
    Case("non-UTF-8", EXIT_DATA, lambda c: {"QLORA_DATA": c.data("train.jsonl", json.dumps(GOOD).encode() + b"\n"
                                                                 + b'{"text": "caf\xe9"}\n')},
         ("train.jsonl:2",), "re-encode the file as UTF-8"),
    Case("a single 50 MB line", EXIT_DATA,
         lambda c: {"QLORA_DATA": c.data("train.jsonl", json.dumps(
             {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x" * 50_000_000}]}))},
         ("train.jsonl:1", "47.7 MiB"), "split it into several records or drop it"),
    Case("prefix without data files", EXIT_DATA,
         lambda c: {"QLORA_DATA": str(Path(c.data("README.md", "hello"), c.data("_SUCCESS", "")).parent)},
         ("data", "ignored as not data: README.md, _SUCCESS"), "no data files found under this prefix"),
    Case("unsupported file type", EXIT_DATA, lambda c: {"QLORA_DATA": c.data("train.txt", "a,b\n")},
         ("train.txt",), "use .jsonl, .ndjson, .json, .parquet, .csv or .tsv"),
    Case("prefix holding files the job cannot read", EXIT_DATA,
         lambda c: {"QLORA_DATA": str(Path(c.jsonl(GOOD), c.data("notes.txt", "x"), c.data("more.zip", "PK")).parent)},
         ("2 file(s)", "more.zip, notes.txt"), "Remove them from the prefix, or point the data setting"),
    Case("truncated .jsonl.gz", EXIT_DATA,
         lambda c: {"QLORA_DATA": c.data("train.jsonl.gz", gzip.compress((json.dumps(GOOD) + "\n").encode() * 50)[:-30])},
         ("train.jsonl.gz", "gzip-compressed JSONL"), "damaged or truncated"),
    Case(".jsonl.gz that decompresses to nothing", EXIT_DATA,
         lambda c: {"QLORA_DATA": c.data("train.jsonl.gz", gzip.compress(b""))},
         ("train.jsonl.gz", "decompresses to nothing"), "remove it or point the data setting elsewhere"),
    Case("CSV row with a stray delimiter", EXIT_DATA,
         lambda c: {"QLORA_DATA": c.data("train.csv", "prompt,completion\nq,a\nq, with a comma,a\n")},
         ("train.csv:3",), "the header has 2"),
    Case(".json that is not an array", EXIT_DATA, lambda c: {"QLORA_DATA": c.data("train.json", '{"a": 1}')},
         ("train.json",), "expected a JSON array of records"),
    Case(".json that is not JSON", EXIT_DATA, lambda c: {"QLORA_DATA": c.data("train.json", "[{,]")},
         ("train.json:1",), "use .jsonl for one record per line"),
    Case("parquet that is not parquet", EXIT_DATA, lambda c: {"QLORA_DATA": c.data("train.parquet", "PAR1 nope")},
         ("train.parquet",), "not a readable Parquet file"),
    Case("explicit format does not match", EXIT_DATA,
         lambda c: {**ok_data(c), "QLORA_DATA_FORMAT": "alpaca"}, ("train.jsonl:1", "`instruction`"), "missing field"),
    Case("too many bad records for the budget", EXIT_DATA,
         lambda c: {"QLORA_DATA": c.jsonl(GOOD, "{", "{", GOOD), "QLORA_MAX_BAD_RECORDS": "1"},
         ("train.jsonl:3",), "more than QLORA_MAX_BAD_RECORDS=1 bad records"),
    Case("bad data on S3 names the object", EXIT_DATA,
         lambda c: {"QLORA_DATA": f"s3://{c.bucket}/bad/train.jsonl"}, ("train.jsonl:1",), "invalid JSON"),
    # ---------------------------------------------------------------- model (exit 4)
    Case("model config missing", EXIT_MODEL, lambda c: {**ok_data(c), "QLORA_MODEL": c.model_copy(drop=("config.json",))},
         ("model-copy", "config.json"), "point QLORA_MODEL at the model's root directory"),
    Case("pickle-only weights", EXIT_MODEL,
         lambda c: {**ok_data(c), "QLORA_MODEL": c.model_copy(drop=("*.safetensors",),
                                                              add={"pytorch_model.bin": b"\x80\x02pickle"})},
         ("pytorch_model.bin",), "QLORA_ALLOW_PICKLE_WEIGHTS=true if you trust their source"),
    Case("no weights at all", EXIT_MODEL, lambda c: {**ok_data(c), "QLORA_MODEL": c.model_copy(drop=("*.safetensors",))},
         ("model-copy",), "no weight files"),
    Case("tokenizer files missing", EXIT_MODEL,
         lambda c: {**ok_data(c), "QLORA_MODEL": c.model_copy(drop=("tokenizer*", "special_tokens_map.json"))},
         ("model-copy",), "needs tokenizer.json, or tokenizer.model with tokenizer_config.json"),
    Case("no chat template, not a Llama tokenizer", EXIT_MODEL, no_template_model, ("chat template",),
         "QLORA_DATA_FORMAT=text"),
    Case("llama-2 template forced on another tokenizer", EXIT_MODEL,
         lambda c: {**ok_data(c), "QLORA_MODEL": str(c.smol), "QLORA_CHAT_TEMPLATE": "llama-2"},
         ("QLORA_CHAT_TEMPLATE=llama-2",), "use QLORA_CHAT_TEMPLATE=auto"),
    Case("model is not a path, URI or Hub id", EXIT_MODEL, lambda c: {**ok_data(c), "QLORA_MODEL": "not a model!"},
         ("QLORA_MODEL='not a model!'",), "a Hub id like meta-llama/Llama-2-7b-hf"),
    Case("Hub model not cached, Hub offline", EXIT_MODEL, lambda c: {**ok_data(c), "QLORA_MODEL": "acme/no-such-model"},
         ("acme/no-such-model",), "point QLORA_MODEL there"),
    # ---------------------------------------------------------------- outputs (exit 6)
    Case("output holds a result", EXIT_OUTPUT_EXISTS,
         lambda c: {**ok_data(c), "QLORA_OUTPUT": str(Path(c.data("out/manifest.json", "{}")).parent)},
         ("out",), "QLORA_OUTPUT_EXISTS=version"),
    Case("S3 output holds a result", EXIT_OUTPUT_EXISTS,
         lambda c: {**ok_data(c), "QLORA_OUTPUT": f"s3://{c.bucket}/done"}, ("s3://bad-input-cases/done",),
         "QLORA_OUTPUT_EXISTS=overwrite"),
    # ---------------------------------------------------------------- never a wrong result with exit 0
    # Each of these trained a wrong model (or crashed with exit 1) before: a model loaded with random layers, every
    # answer truncated away, an eval split that left no training data.
    Case("a layer tensor missing (nf4)", EXIT_MODEL,
         lambda c: {**ok_data(c), "QLORA_MODEL": damaged_model(c, lambda t, m: t.pop("model.layers.1.mlp.up_proj.weight"))},
         ("model.layers.1.mlp.up_proj.weight", "missing from the checkpoint"), "download it again"),
    Case("a layer tensor missing (16-bit LoRA)", EXIT_MODEL,
         lambda c: {**ok_data(c), "QLORA_QUANTIZATION": "none",
                    "QLORA_MODEL": damaged_model(c, lambda t, m: t.pop("model.layers.0.self_attn.q_proj.weight"))},
         ("model.layers.0.self_attn.q_proj.weight", "they would be random"), "download it again"),
    Case("tensors the architecture does not have", EXIT_MODEL,
         lambda c: {**ok_data(c), "QLORA_MODEL": damaged_model(
             c, lambda t, m: t.update({"model.layers.7.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"].clone()}))},
         ("model.layers.7.mlp.up_proj.weight", "not in the architecture of config.json"), "complete directory"),
    Case("config.json of another shape", EXIT_MODEL,
         lambda c: {**ok_data(c), "QLORA_MODEL": damaged_model(c, config={"intermediate_size": 200})},
         ("of another shape than config.json says", "mlp.gate_proj.weight [256, 128] vs [200, 128]"),
         "another architecture"),
    Case("config.json of another shape (16-bit LoRA)", EXIT_MODEL,
         lambda c: {**ok_data(c), "QLORA_QUANTIZATION": "none",
                    "QLORA_MODEL": damaged_model(c, config={"intermediate_size": 200})},
         ("do not match config.json",), "use the model's own config.json"),
    Case("config.json of another architecture", EXIT_MODEL,
         lambda c: {**ok_data(c), "QLORA_MODEL": damaged_model(c, config={
             "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_layer": 2, "n_head": 4})},
         ("config.json", "not the config of a Llama-class decoder"), "point QLORA_MODEL at one"),
    Case("truncated safetensors", EXIT_MODEL,
         lambda c: {**ok_data(c), "QLORA_MODEL": damaged_model(c, truncate=True)},
         ("model.safetensors", "truncated"), "download or copy the model again"),
    Case("shard index names a missing shard", EXIT_MODEL,
         lambda c: {**ok_data(c), "QLORA_MODEL": damaged_model(c, extra={"model.safetensors.index.json": json.dumps(
             {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})})},
         ("model-00002-of-00002.safetensors",), "download or copy the whole model again"),
    Case("every answer truncated away", EXIT_DATA,
         lambda c: {"QLORA_DATA": long_prompts(c), "QLORA_MAX_SEQ_LENGTH": "32", "QLORA_EVAL_FRACTION": "0"},
         ("QLORA_MAX_SEQ_LENGTH=32", "truncates away every one"), "Raise QLORA_MAX_SEQ_LENGTH"),
    Case("output inside the data prefix", EXIT_CONFIG,
         lambda c: {"QLORA_DATA": f"s3://{c.bucket}/bad/", "QLORA_OUTPUT": f"s3://{c.bucket}/bad/out"},
         ("QLORA_OUTPUT=", "QLORA_DATA=", "read the outputs as training data"), "Give them separate locations"),
    Case("output inside the job's scratch space", EXIT_CONFIG,
         lambda c: {**ok_data(c), "QLORA_OUTPUT": str(c.tmp / "opt-ml" / "work" / "output")},
         ("QLORA_OUTPUT=", "QLORA_BASE_DIR="), "Give them separate locations"),
    Case("a LoRA target the model does not have", EXIT_CONFIG,
         lambda c: {**ok_data(c), "QLORA_LORA_TARGET_MODULES": "q_proj,value_proj"},
         ("QLORA_LORA_TARGET_MODULES='q_proj,value_proj'", "value_proj match no module"), "v_proj"),
    Case("the output head as a LoRA target", EXIT_CONFIG,
         lambda c: {**ok_data(c), "QLORA_LORA_TARGET_MODULES": "q_proj,lm_head"}, ("QLORA_LORA_TARGET_MODULES",),
         "all-linear"),
    Case("eval data that is the training data", EXIT_CONFIG,
         lambda c: {"QLORA_DATA": c.jsonl(GOOD, GOOD), "QLORA_EVAL_DATA": str(c.tmp / "data" / "train.jsonl"),
                    "QLORA_EVAL_FRACTION": "0"}, ("QLORA_EVAL_DATA=", "not held out"), "separate locations"),
    Case("null in hyperparameters.json", EXIT_CONFIG,
         lambda c: {**ok_data(c), "_HP": json.dumps({"checkpoint_dir": None})},
         ("hyperparameters.json key 'checkpoint_dir' is null",),
         "remove the key to use the default"),
    Case("seed out of range", EXIT_CONFIG, lambda c: {**ok_data(c), "QLORA_SEED": "-1"}, ("QLORA_SEED=-1",),
         "between 0 and 4294967295"),
    Case("a chat template that refuses the records", EXIT_DATA, template_refuses_system,
         ("train.jsonl:1", "the chat template refuses this conversation"), "QLORA_MAX_BAD_RECORDS"),
    Case("half of a surrogate pair in a record", EXIT_DATA,
         lambda c: {"QLORA_DATA": c.data("train.jsonl", '{"messages": [{"role": "user", "content": "hi \\ud83d"},'
                                                        ' {"role": "assistant", "content": "ok"}]}\n')},
         ("train.jsonl:1", "surrogate"), "fix or drop the record"),
    Case("an attention kernel that is not installed", EXIT_CONFIG,
         lambda c: {**ok_data(c), "QLORA_ATTN_IMPLEMENTATION": "flash_attention_2"}, ("QLORA_ATTN_IMPLEMENTATION",),
         "use QLORA_ATTN_IMPLEMENTATION=sdpa"),
    Case("an eval suite question without a reference", EXIT_DATA,
         lambda c: {**ok_data(c), "QLORA_EVAL_SUITE": c.data("facts.jsonl", '{"prompt": "Q?", "reference": "A"}\n'
                                                                            '{"prompt": "Capital?"}\n')},
         ("facts.jsonl:2", "no `reference` answer"), "needs the answer it is scored against"),
    Case("an eval suite item with an unknown metric", EXIT_DATA,
         lambda c: {**ok_data(c), "QLORA_EVAL_SUITE": c.data("facts.jsonl", '{"prompt": "Q?", "reference": "A",'
                                                                            ' "metric": "bleu"}\n')},
         ("facts.jsonl:1", "unknown metric 'bleu'"), "use one of exact_match, contains, token_f1, rouge_l"),
    Case("an empty eval suite", EXIT_DATA,
         lambda c: {**ok_data(c), "QLORA_EVAL_SUITE": c.data("facts.jsonl", "\n")},
         ("facts.jsonl", "the evaluation suite is empty"), "remove it from QLORA_EVAL_SUITE"),
    Case("two eval suites of the same name", EXIT_CONFIG,
         lambda c: {**ok_data(c), "QLORA_EVAL_SUITE": f"{c.data('a/facts.jsonl', '')},{c.data('b/facts.jsonl', '')}"},
         ("QLORA_EVAL_SUITE", "are both named 'facts'"), "rename one of the files"),
    Case("training data copied twice over", EXIT_DATA,
         lambda c: {"QLORA_DATA": c.jsonl(*[qa(i) for i in range(4)] * 3), "QLORA_EVAL_FRACTION": "0"},
         ("8 of the 12 training records (67%) repeat the prompt", "QLORA_MAX_DUPLICATE_FRACTION=0.5"),
         "Remove the duplicates"),
    Case("most records longer than max_seq_length", EXIT_DATA,
         lambda c: {"QLORA_DATA": c.jsonl(*[qa(i, " and so on" * 20) for i in range(4)]),
                    "QLORA_MAX_SEQ_LENGTH": "40", "QLORA_EVAL_FRACTION": "0"},
         ("4 of the 4 training records (100%) are longer than QLORA_MAX_SEQ_LENGTH=40",
          "QLORA_MAX_TRUNCATED_FRACTION=0.5"), "Raise QLORA_MAX_SEQ_LENGTH"),
    Case("eval fraction leaves nothing to train on", EXIT_CONFIG,
         lambda c: {**ok_data(c), "QLORA_EVAL_FRACTION": "0.9"}, ("QLORA_EVAL_FRACTION=0.9", "leaving none"),
         "lower it"),
]


@pytest.fixture(scope="module")
def assets(cache_dir):
    return tiny_llama2(cache_dir), smollm2(cache_dir)


@pytest.fixture(scope="module")
def bucket(s3_server):
    from entrypoints import storage

    name = "bad-input-cases"
    s3_server.client().create_bucket(Bucket=name)
    client = s3_server.client()
    client.put_object(Bucket=name, Key="bad/train.jsonl", Body=b'{"messages": [\n')
    client.put_object(Bucket=name, Key="done/manifest.json", Body=b"{}")
    storage._client.cache_clear()
    return name


def _job_environment(monkeypatch, settings: dict[str, str], s3_server=None) -> None:
    """Only these settings reach the job: nothing from the caller's QLORA_*, SageMaker or AWS variables."""
    import os

    from entrypoints import storage

    for key in list(os.environ):
        if key.startswith(("QLORA_", "SM_CHANNEL_", "AWS_")):
            monkeypatch.delenv(key)
    for key, value in (s3_server.env() if s3_server else {}).items():
        monkeypatch.setenv(key, value)
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, when it is first imported (maybe by an earlier test of this process):
    # the value it already read is set too, so no case reaches for the network (an outage is exit 5: test_hub.py).
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    storage._client.cache_clear()  # AWS_MAX_ATTEMPTS and credentials are read when the client is made


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, assets, bucket, s3_server, tmp_path, monkeypatch, capsys, restore_signals):
    from entrypoints import storage

    model, smol = assets
    ctx = Ctx(tmp_path, model, smol, bucket, s3_server.endpoint, s3_server)
    base = tmp_path / "opt-ml"
    settings = {"QLORA_MODEL": str(model), "QLORA_OUTPUT": str(tmp_path / "output"), "QLORA_BASE_DIR": str(base),
                "QLORA_S3_ENDPOINT_URL": s3_server.endpoint, "QLORA_REPORT_TO": "none", **case.setup(ctx)}
    hp = settings.pop("_HP", None)
    if hp is not None:
        (base / "input" / "config").mkdir(parents=True)
        (base / "input" / "config" / "hyperparameters.json").write_text(hp)
    _job_environment(monkeypatch, settings, s3_server)

    code = train.main(list(case.argv))
    out = capsys.readouterr()
    output = out.out + out.err
    storage._client.cache_clear()

    assert code == case.code, output[-3000:]
    failure = (base / "output" / "failure").read_text()
    assert "Traceback" not in output and "Traceback" not in failure
    last_line = out.out.rstrip().splitlines()[-1]  # the log (stdout); stderr holds progress bars
    # One paragraph, logged last: the failure file's first line ends the log.
    assert failure.splitlines()[0] in last_line or failure.splitlines()[-1].strip() in last_line, (last_line, failure)
    for name in case.names:
        assert name in failure, (name, failure)
    assert case.fix in failure, (case.fix, failure)
    assert len(failure) <= 1024


def test_every_file_form_in_a_prefix_is_trained_on(assets, tmp_path, monkeypatch, capsys, restore_signals):
    """Finding 7: in a prefix holding a.jsonl.gz, b.NDJSON, C.JSONL and d.jsonl only d.jsonl was read, without
    a word. The job now trains on all ten records and logs each file; eval data given as QLORA_EVAL_DATA is
    not warned about for its name."""
    model, _ = assets
    data = tmp_path / "data"
    data.mkdir()

    def lines(n: int, tag: str) -> bytes:
        return "".join(json.dumps({"messages": [{"role": "user", "content": f"Question {tag}{i}?"},
                                                {"role": "assistant", "content": f"Answer {tag}{i}."}]}) + "\n"
                       for i in range(n)).encode()

    (data / "a.jsonl.gz").write_bytes(gzip.compress(lines(3, "a")))
    (data / "b.NDJSON").write_bytes(lines(2, "b"))
    (data / "C.JSONL").write_bytes(lines(4, "c"))
    (data / "d.jsonl").write_bytes(lines(1, "d"))
    (tmp_path / "eval.jsonl").write_bytes(lines(2, "e"))
    output = tmp_path / "output"
    _job_environment(monkeypatch, {
        "QLORA_MODEL": str(model), "QLORA_DATA": str(data), "QLORA_EVAL_DATA": str(tmp_path / "eval.jsonl"),
        "QLORA_OUTPUT": str(output), "QLORA_BASE_DIR": str(tmp_path / "opt-ml"), "QLORA_REPORT_TO": "none",
        "QLORA_MAX_STEPS": "1", "QLORA_MICRO_BATCH_SIZE": "2", "QLORA_GRADIENT_ACCUMULATION_STEPS": "1",
        "QLORA_MERGE": "false", "QLORA_NUM_SAMPLE_GENERATIONS": "0", "QLORA_MAX_SEQ_LENGTH": "64"})

    code = train.main([])
    log = capsys.readouterr().out

    assert code == 0, log[-3000:]
    stats = json.loads((output / "manifest.json").read_text())["data"]
    assert (stats["train_records_read"], stats["train_records"], stats["eval_records"]) == (10, 10, 2), stats
    assert stats["format"] == "messages" and stats["bad_records_skipped"] == 0
    for name, kind, count in (("a.jsonl.gz", "jsonl+gzip", 3), ("b.NDJSON", "jsonl", 2), ("C.JSONL", "jsonl", 4),
                              ("d.jsonl", "jsonl", 1)):
        assert f"{name}: {kind}, format messages (detected): {count} record(s) read, 0 bad skipped" in log, name
    assert "suggests held-out data" not in log


def test_the_table_covers_every_area_and_at_least_40_cases():
    codes = [c.code for c in CASES]
    assert len(CASES) >= 40
    assert {EXIT_CONFIG, EXIT_DATA, EXIT_MODEL, EXIT_STORAGE, EXIT_OUTPUT_EXISTS} <= set(codes)


# --------------------------------------------------------------------------------------- property test
KEYS = ["messages", "conversations", "instruction", "input", "output", "context", "response", "prompt", "completion",
        "text", "system", "role", "content", "from", "value", "type"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12) | st.sampled_from(["user", "assistant", "gpt"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
    max_leaves=12)
LINES = st.one_of(st.dictionaries(st.sampled_from(KEYS), JSON_VALUES, max_size=4).map(json.dumps),
                  JSON_VALUES.map(json.dumps), st.binary(max_size=40))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(LINES, min_size=1, max_size=5), st.sampled_from(["auto", *FORMATS]))
def test_any_file_is_either_normalised_or_a_data_error_naming_it(lines, fmt):
    """Whatever bytes a JSONL file holds, the reader either yields conversations every chat template accepts
    or raises a DataError naming the file (never another exception: that would be exit 1, a traceback)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
        try:
            out = list(load_conversations(path, fmt))
        except DataError as exc:
            assert str(path) in str(exc)
            return
    assert out
    for conv in out:
        if isinstance(conv, str):
            assert conv.strip()
            continue
        body = conv[1:] if conv[0]["role"] == "system" else conv
        assert body and all(m["role"] == ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(body))
        assert body[-1]["role"] == "assistant" and all(isinstance(m["content"], str) for m in conv)
