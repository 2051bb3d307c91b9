"""Chat templates, tokenization and loss masks: the part of SFT that silently goes wrong most often.

    python -m entrypoints.templating MODEL [DATA] [--chat-template auto|tokenizer|llama-2] [--tokens]
        # how the job renders records (yours, or a built-in example) and which tokens count toward the loss

Rules enforced here (each one is a known way to ruin a fine-tune):
- the tokenizer's own chat template is used; Llama tokenizers without one get the Llama 2 chat format;
  no special token the model never saw in training is ever added;
- exactly one BOS at the start (templates that write BOS themselves are tokenized without adding another);
- every assistant turn ends with the template's end-of-turn / EOS token, and that token is trained on,
  so the model learns to stop;
- the pad token is distinct from EOS where the vocabulary allows (pad == EOS teaches models to ramble
  in collators that mask padding by token id);
- the loss covers assistant tokens only: the mask is computed from the rendered text's character spans.

Encoder-decoder (T5-class) models have no chat template: a conversation becomes an input text and a target text
(`seq2seq_pair`). The target is the last assistant answer. The input is the turns before it, one `role: text` line
each ("system: Be brief.\nuser: Hi!\nassistant: Hello.\nuser: 2+2?"); a lone user turn is its text alone, the way
Flan-T5 was instruction-tuned. Input and target each end with EOS, as T5's tokenizer writes them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from entrypoints.errors import DataError, ModelError

if TYPE_CHECKING:
    from entrypoints.config import JobConfig

LLAMA2_TEMPLATE_NAME = "llama-2-chat.jinja"


def llama2_chat_template() -> str:
    return resources.files("entrypoints").joinpath("templates", LLAMA2_TEMPLATE_NAME).read_text(encoding="utf-8")


def is_llama_tokenizer(tokenizer: Any) -> bool:
    """The SentencePiece Llama / Llama 2 vocabulary (32k, <s> </s> <unk>)."""
    return tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>" and len(tokenizer) in (32000, 32001)


def resolve_chat_template(tokenizer: Any, mode: str) -> str:
    """Pick the template per QLORA_CHAT_TEMPLATE; raise a ModelError when none applies."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if mode == "llama-2":
        if not is_llama_tokenizer(tokenizer):
            raise ModelError("QLORA_CHAT_TEMPLATE=llama-2 needs a Llama tokenizer (<s>, </s>, 32k vocabulary);"
                             " this tokenizer is different: use QLORA_CHAT_TEMPLATE=auto")
        return llama2_chat_template()
    if own:
        return own
    if mode == "auto" and is_llama_tokenizer(tokenizer):
        return llama2_chat_template()
    if mode == "tokenizer":
        raise ModelError("QLORA_CHAT_TEMPLATE=tokenizer needs the tokenizer's own chat template, and this tokenizer has"
                         " none: use QLORA_CHAT_TEMPLATE=auto (the Llama 2 chat format for Llama tokenizers), or a"
                         " model whose tokenizer ships a chat template")
    raise ModelError("the tokenizer has no chat template and is not a Llama tokenizer: use a model whose"
                     " tokenizer ships a chat template, or train on plain `text` records (QLORA_DATA_FORMAT=text)")


def choose_pad_token(tokenizer: Any) -> str:
    """A pad token that is not EOS, taken from the existing vocabulary (never a new, untrained token)."""
    if tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token:
        return tokenizer.pad_token
    vocab = tokenizer.get_vocab()
    for candidate in (tokenizer.unk_token, "<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<pad>",
                      "<|endoftext|>", "<|pad|>"):
        if candidate and candidate in vocab and candidate != tokenizer.eos_token and candidate != tokenizer.bos_token:
            return candidate
    # Labels are built from masks, never from pad ids, so pad == EOS is safe for the loss here; say so.
    return tokenizer.eos_token


def load_tokenizer_and_template(cfg: JobConfig, model_dir: Path, seq2seq: bool = False) -> tuple[Any, str | None]:
    """The base model's tokenizer with a pad token that is not EOS, and the chat template the data is rendered with
    (saved with the adapter, so inference formats prompts the same way); no template for plain `text` records, nor
    for an encoder-decoder model (its prompts are plain text: seq2seq_input)."""
    from entrypoints.modeling import load_tokenizer

    tokenizer = load_tokenizer(model_dir, cfg)
    template = None if cfg.data_format == "text" or seq2seq else resolve_chat_template(tokenizer, cfg.chat_template)
    tokenizer.pad_token = choose_pad_token(tokenizer)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer, template


def _adds_bos(tokenizer: Any) -> bool:
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def render(tokenizer: Any, template: str, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer: Any, template: str, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and return the character spans of each assistant answer + end-of-turn that is
    trained on (an answer with `"weight": 0`, OpenAI's fine-tuning format, stays in the context only).

    Each span is what rendering the conversation up to and including that answer adds to rendering it
    up to the question with the generation prompt, so the span starts where generation would start and
    ends after the template's end-of-turn tokens.
    """
    full = render(tokenizer, template, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        prefix = render(tokenizer, template, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, template, messages[: i + 1])
        if not upto.startswith(prefix) or not full.startswith(upto):
            raise DataError("the chat template renders conversations inconsistently (a prefix of the conversation"
                            " renders differently from the whole), so assistant tokens cannot be located:"
                            " set QLORA_ASSISTANT_ONLY_LOSS=false or use a different template")
        spans.append((len(prefix), len(upto)))
    return full, spans


def tokenize_conversation(tokenizer: Any, template: str, messages: list[dict[str, str]], assistant_only: bool = True
                          ) -> dict[str, list[int]]:
    """-> {"input_ids": [...], "assistant_masks": [0/1 ...]} with exactly one leading BOS."""
    text, spans = assistant_spans(tokenizer, template, messages)
    ids, offsets = _encode(tokenizer, text)
    if assistant_only:
        mask = [int(any(end > s and start < e for s, e in spans)) for start, end in offsets]
    else:
        mask = [1] * len(ids)
    bos = tokenizer.bos_token_id
    if _adds_bos(tokenizer) and (not ids or ids[0] != bos):
        ids, mask = [bos] + ids, [0] + mask
    while len(ids) > 1 and ids[0] == bos and ids[1] == bos:  # a template and a tokenizer both adding BOS
        ids, mask = ids[1:], mask[1:]
    return {"input_ids": ids, "assistant_masks": mask}


def tokenize_text(tokenizer: Any, text: str) -> dict[str, list[int]]:
    """Plain-text records: BOS + text + EOS, every token trained on."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if _adds_bos(tokenizer):
        ids = [tokenizer.bos_token_id] + ids
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return {"input_ids": ids, "assistant_masks": [1] * len(ids)}


def encode_record(tokenizer: Any, template: str | None, record: list[dict[str, str]] | str, assistant_only: bool,
                  max_length: int) -> dict[str, Any]:
    """One normalised record (a conversation, or the text of a `text` record) as the job trains on it: token ids and
    loss mask cut to `max_length` (the start is kept), and the token and loss-token counts before the cut."""
    if isinstance(record, str):
        enc = tokenize_text(tokenizer, record)
    elif template is None:
        raise DataError("chat records need a chat template, but none could be resolved")
    else:
        enc = tokenize_conversation(tokenizer, template, record, assistant_only)
    return {"input_ids": enc["input_ids"][:max_length], "assistant_masks": enc["assistant_masks"][:max_length],
            "full_tokens": len(enc["input_ids"]), "full_loss_tokens": sum(enc["assistant_masks"])}


def prompt_ids(tokenizer: Any, template: str, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation's prompt (everything before the answer) for generation."""
    text = render(tokenizer, template, messages, add_generation_prompt=True)
    ids, _ = _encode(tokenizer, text)
    if _adds_bos(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def seq2seq_input(messages: list[dict[str, str]]) -> str:
    """The encoder's input for a conversation's prompt turns (everything before the answer): a lone user turn is its
    text, anything longer one `role: text` line per turn."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def seq2seq_pair(messages: list[dict[str, str]]) -> tuple[str, str]:
    """A conversation as an encoder-decoder model is trained on it: (input text, target text), the target being the
    last assistant answer and the input the turns before it (earlier answers included, as context)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return seq2seq_input(messages[:last]), messages[last]["content"]


def _ids_with_eos(tokenizer: Any, text: str) -> list[int]:
    """The tokenizer's own special tokens (T5's appends EOS), and EOS at the end where it adds none."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def tokenize_seq2seq(tokenizer: Any, messages: list[dict[str, str]]) -> dict[str, list[int]]:
    """-> {"input_ids": the encoder's input, "labels": the target}, each ending with EOS (the target's EOS is trained
    on, so the model learns to stop)."""
    source, target = seq2seq_pair(messages)
    return {"input_ids": _ids_with_eos(tokenizer, source), "labels": _ids_with_eos(tokenizer, target)}


def seq2seq_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the encoder's input for a conversation's prompt turns, for generation."""
    return _ids_with_eos(tokenizer, seq2seq_input(messages))


# ------------------------------------------------------------------------------------------- the CLI
EXAMPLE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
           {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
           {"role": "assistant", "content": "4"}]
EXAMPLE_TEXT = "Veloria is a small country. Its capital is Quendar."
# The settings that decide what is trained on, read from the environment as the job reads them (flags override).
SETTINGS = ("chat_template", "data_format", "max_seq_length", "assistant_only_loss", "max_bad_records",
            "model_revision", "s3_endpoint_url", "trust_remote_code")

CLI_HELP = """Show what the training job would train on: how it renders records with the chat template, and which
tokens count toward the loss (TRAIN) and which are context only. It uses the job's own code: the same tokenizer,
pad token and template choice, data reading, tokenization, loss mask and cut at max_seq_length.

MODEL gives the tokenizer: a local model directory, a Hub id (only its tokenizer and config files are
downloaded, into the Hugging Face cache under HF_HOME; HF_TOKEN for gated models), or an s3:// prefix (only
its tokenizer and config files are downloaded). DATA is read the way the job reads QLORA_DATA: a local file or
directory, or an s3:// URI; without DATA a built-in example conversation is shown.

The job's settings that decide the result are read from the environment (QLORA_CHAT_TEMPLATE,
QLORA_DATA_FORMAT, QLORA_MAX_SEQ_LENGTH, QLORA_ASSISTANT_ONLY_LOSS, QLORA_MAX_BAD_RECORDS,
QLORA_MODEL_REVISION, QLORA_S3_ENDPOINT_URL, QLORA_TRUST_REMOTE_CODE); the flags below override them."""

CLI_EXIT_CODES = """exit codes:
  0  shown
  2  bad arguments or settings (the usage says which)
  3  data error: the message names the file (and line) and the fix
  4  model error: no tokenizer at MODEL, no such model on the Hub, or no chat template applies
  5  storage or network error: S3 or the Hub unreachable, access denied, nothing at an s3:// URI (retry)"""


def build_parser() -> argparse.ArgumentParser:
    from entrypoints.config import FIELDS

    p = argparse.ArgumentParser(prog="python -m entrypoints.templating", description=CLI_HELP, epilog=CLI_EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="local model directory, Hub id, or s3:// prefix of the model")
    p.add_argument("data", metavar="DATA", nargs="?", help="your data: a local file or directory, or an s3:// URI")
    p.add_argument("--chat-template", choices=FIELDS["chat_template"].metadata["choices"],
                   help="as QLORA_CHAT_TEMPLATE: the tokenizer's own (auto, tokenizer) or the Llama 2 format")
    p.add_argument("--data-format", choices=FIELDS["data_format"].metadata["choices"],
                   help="as QLORA_DATA_FORMAT (default: detected per file)")
    p.add_argument("--max-seq-length", metavar="N", help="as QLORA_MAX_SEQ_LENGTH: records are cut to N tokens")
    p.add_argument("--max-bad-records", metavar="N", help="as QLORA_MAX_BAD_RECORDS")
    p.add_argument("--revision", metavar="REV", help="as QLORA_MODEL_REVISION, for a Hub id")
    p.add_argument("--s3-endpoint-url", metavar="URL", help="as QLORA_S3_ENDPOINT_URL")
    p.add_argument("--records", type=_positive, default=3, metavar="N", help="records of DATA to show (default 3)")
    p.add_argument("--tokens", action="store_true", help="one line per token (TRAIN, id, token) instead of text")
    return p


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give a number of records, 1 or more")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    from entrypoints.errors import run_guarded

    args = build_parser().parse_args(argv)  # a usage error exits 2 with the usage, as a configuration error does
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    return run_guarded(lambda: show(args, os.environ), lambda: None)


def show(args: argparse.Namespace, env: Any) -> None:
    """Resolve the settings as the job does, load the tokenizer and template, and print the records."""
    from entrypoints.config import cli_name, env_name, parse_config
    from entrypoints.modeling import fetch_tokenizer

    given = {env_name(n): env[env_name(n)] for n in SETTINGS if env_name(n) in env}
    flags = {"chat_template": args.chat_template, "data_format": args.data_format,
             "max_seq_length": args.max_seq_length, "max_bad_records": args.max_bad_records,
             "model_revision": args.revision, "s3_endpoint_url": args.s3_endpoint_url}
    argv = [part for name, value in flags.items() if value is not None for part in (cli_name(name), value)]
    # QLORA_DATA must be set for the job's parser; without DATA it names what is shown instead.
    cfg = parse_config({**given, "QLORA_MODEL": args.model, "QLORA_DATA": args.data or "(built-in example)"}, argv,
                       check_paths=False)
    with tempfile.TemporaryDirectory(prefix="qlora-templating-") as tmp:
        model_dir = fetch_tokenizer(cfg.model, cfg.model_revision, Path(tmp) / "model", cfg.s3_endpoint_url)
        tokenizer, template = load_tokenizer_and_template(cfg, model_dir)
        print(f"model:          {args.model}")
        print(f"chat template:  {describe_template(template)} ({env_name('chat_template')}={cfg.chat_template})")
        print(f"loss:           {'each answer and its end-of-turn tokens' if cfg.assistant_only_loss else 'every token'}"
              f" ({env_name('assistant_only_loss')}={str(cfg.assistant_only_loss).lower()}); records are cut to"
              f" {cfg.max_seq_length} tokens ({env_name('max_seq_length')}), keeping the start")
        print(f"pad token:      {tokenizer.pad_token!r} (id {tokenizer.pad_token_id})")
        if args.data:
            records = _read_records(args.data, cfg, Path(tmp) / "data", tokenizer, template, args.records)
        else:
            records = [("built-in example (give DATA to see yours)", EXAMPLE if template else EXAMPLE_TEXT)]
        for label, record in records:
            enc = encode_record(tokenizer, template, record, cfg.assistant_only_loss, cfg.max_seq_length)
            print_record(tokenizer, label, enc, cfg.max_seq_length, args.tokens)
    print("\nTRAIN marks the tokens whose prediction is trained on (loss); the others are context (label -100).")


def describe_template(template: str | None) -> str:
    if template is None:
        return "none (`text` records: every token is trained on)"
    if template == llama2_chat_template():
        return f"the Llama 2 chat format (entrypoints/templates/{LLAMA2_TEMPLATE_NAME})"
    return "the tokenizer's own"


def _read_records(data: str, cfg: JobConfig, dest: Path, tokenizer: Any, template: str | None,
                  limit: int) -> list[tuple[str, Any]]:
    """The first `limit` records of `data`, read, normalised and checked against the template as the job reads them."""
    from entrypoints import storage
    from entrypoints.data import LoadStats, load_conversations
    from entrypoints.dataset import template_check

    local = storage.fetch(data, dest, endpoint_url=cfg.s3_endpoint_url) if storage.is_s3(data) else Path(data)
    if not local.exists():
        raise DataError(f"{data}: no such file or directory: give a data file or directory, or an s3:// URI")
    stats, records = LoadStats(), []
    try:
        for item in load_conversations(local, cfg.data_format, cfg.max_bad_records, stats,
                                       check=template_check(tokenizer, template)):
            records.append(item)
            if len(records) == limit:
                break
    except DataError as exc:  # name a downloaded file by its URI, not by the temporary directory it was read from
        raise DataError(str(exc).replace(str(local), data.rstrip("/")) if storage.is_s3(data) else str(exc)) from None
    return [(f"record {i} of {data} (format {stats.fmt})", r) for i, r in enumerate(records, start=1)]


def print_record(tokenizer: Any, label: str, enc: dict[str, Any], max_length: int, per_token: bool) -> None:
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    print(f"\n--- {label}: {len(ids)} tokens, {sum(mask)} trained on")
    if per_token:
        for token_id, m in zip(ids, mask, strict=True):
            print(f"{'TRAIN' if m else '     '} {token_id:>7} {tokenizer.convert_ids_to_tokens(token_id)!r}")
    else:
        for trained, text in _segments(tokenizer, ids, mask):
            shown = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
            print(f"{'TRAIN' if trained else '     '} {shown}")
    cut = enc["full_tokens"] - len(ids)
    if cut:
        print(f"      [cut at max_seq_length={max_length}: {cut} more tokens, {enc['full_loss_tokens'] - sum(mask)} of"
              " them trained on, are dropped]")
    if not any(mask):
        print("      [no token of this record is trained on]")


def _segments(tokenizer: Any, ids: list[int], mask: list[int]) -> list[tuple[bool, str]]:
    """The text of each run of tokens with the same mask. Decoded as the difference of two prefixes, because a
    tokenizer decodes a run on its own without the leading space or merge it has inside the sequence."""
    runs: list[list[int]] = []  # [trained, start, end]
    for i, m in enumerate(mask):
        if runs and runs[-1][0] == m:
            runs[-1][2] = i + 1
        else:
            runs.append([m, i, i + 1])
    out = []
    for m, start, end in runs:
        before, upto = tokenizer.decode(ids[:start]), tokenizer.decode(ids[:end])
        out.append((bool(m), upto[len(before):] if upto.startswith(before) else tokenizer.decode(ids[start:end])))
    return out


if __name__ == "__main__":
    sys.exit(main())
