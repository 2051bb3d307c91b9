"""Chat templates, tokenization and loss masks: the part of SFT that silently goes wrong most often.

    python -m entrypoints.templating MODEL_DIR   # render and show the loss mask of a sample conversation

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

import sys
from importlib import resources
from typing import Any

from entrypoints.errors import DataError, ModelError

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


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    args = sys.argv[1:] if argv is None else argv
    tok = AutoTokenizer.from_pretrained(args[0])
    template = resolve_chat_template(tok, "auto")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    out = tokenize_conversation(tok, template, messages)
    for token_id, m in zip(out["input_ids"], out["assistant_masks"], strict=True):
        print(f"{'TRAIN' if m else '     '} {token_id:>7} {tok.convert_ids_to_tokens(token_id)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
