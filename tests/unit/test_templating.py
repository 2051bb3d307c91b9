"""Chat templating and loss masks, checked token by token on the real Llama 2 and SmolLM2 tokenizers."""

import pytest
from transformers import AutoTokenizer

from entrypoints.demo.assets import llama2_tokenizer, smollm2
from entrypoints.errors import ModelError
from entrypoints.templating import (
    choose_pad_token,
    prompt_ids,
    resolve_chat_template,
    tokenize_conversation,
    tokenize_text,
)

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module")
def llama(cache_dir):
    return AutoTokenizer.from_pretrained(llama2_tokenizer(cache_dir))


@pytest.fixture(scope="module")
def smol(cache_dir):
    return AutoTokenizer.from_pretrained(smollm2(cache_dir))


def _trained(tok, enc):
    return [tok.convert_ids_to_tokens(i) for i, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]


def test_llama2_format_and_labels(llama):
    assert llama.chat_template is None
    template = resolve_chat_template(llama, "auto")
    enc = tokenize_conversation(llama, template, CONV)
    ids = enc["input_ids"]
    text = llama.decode(ids)
    assert text.startswith("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi! [/INST] Hello. </s><s>[INST] 2+2? [/INST] 4 </s>")
    assert ids[0] == llama.bos_token_id and ids[1] != llama.bos_token_id  # exactly one BOS at the start
    assert _trained(llama, enc) == ["▁Hello", ".", "▁", "</s>", "▁", "4", "▁", "</s>"]
    # every assistant turn ends with a trained EOS, nothing else is trained
    assert ids.count(llama.eos_token_id) == 2
    assert all(m == 1 for i, m in zip(ids, enc["assistant_masks"], strict=True) if i == llama.eos_token_id)


def test_smollm2_own_template_and_labels(smol):
    template = resolve_chat_template(smol, "auto")
    assert template == smol.chat_template
    enc = tokenize_conversation(smol, template, CONV)
    assert _trained(smol, enc) == ["Hello", ".", "<|im_end|>", "Ċ", "4", "<|im_end|>", "Ċ"]
    # <|im_start|> (its BOS) opens each turn; no extra BOS is added in front
    assert enc["input_ids"].count(smol.bos_token_id) == len(CONV) and enc["input_ids"][0] == smol.bos_token_id
    assert smol.decode(enc["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_full_sequence_loss_when_asked(smol):
    enc = tokenize_conversation(smol, smol.chat_template, CONV, assistant_only=False)
    assert all(enc["assistant_masks"])


def test_pad_is_not_eos_and_exists(llama, smol):
    assert smol.pad_token == smol.eos_token  # the shipped tokenizer pads with EOS ...
    assert choose_pad_token(smol) == "<|endoftext|>"  # ... we pick an existing, distinct token
    assert choose_pad_token(llama) == "<unk>"
    vocab_before = len(llama)
    choose_pad_token(llama)
    assert len(llama) == vocab_before  # nothing added


def test_prompt_ids_end_with_generation_prompt(llama, smol):
    msgs = CONV[:2]
    assert llama.decode(prompt_ids(llama, resolve_chat_template(llama, "auto"), msgs)).endswith("Hi! [/INST]")
    assert smol.decode(prompt_ids(smol, smol.chat_template, msgs)).endswith("<|im_start|>assistant\n")


def test_text_records(llama):
    enc = tokenize_text(llama, "plain text")
    assert enc["input_ids"][0] == llama.bos_token_id and enc["input_ids"][-1] == llama.eos_token_id
    assert all(enc["assistant_masks"])


def test_no_template_for_non_llama_tokenizer(smol):
    smol_copy = AutoTokenizer.from_pretrained(smol.name_or_path)
    smol_copy.chat_template = None
    with pytest.raises(ModelError, match="no chat template"):
        resolve_chat_template(smol_copy, "auto")
    with pytest.raises(ModelError, match="needs a Llama tokenizer"):
        resolve_chat_template(smol_copy, "llama-2")
