"""Chat templating and loss masks, checked token by token on the real Llama 2 and SmolLM2 tokenizers; the
`python -m entrypoints.templating` tool as a user runs it."""

import json
import os

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


# ---------------------------------------------------------------------------------- python -m entrypoints.templating
@pytest.fixture
def cli(capsys, caplog, monkeypatch):
    """Run `python -m entrypoints.templating ARGS` in this process: (exit code, stdout, stderr + the log)."""
    from entrypoints.templating import main

    def run(*argv, env=None):
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        caplog.clear()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse: usage errors and --help
            code = exc.code
        out = capsys.readouterr()
        return code, out.out, out.err + caplog.text

    for key in [k for k in os.environ if k.startswith("QLORA_")]:
        monkeypatch.delenv(key)
    return run


def _data(tmp_path, records):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


MINE = [{"messages": [{"role": "user", "content": "Capital of Veloria?"}, {"role": "assistant", "content": "Quendar."}]},
        {"messages": [{"role": "user", "content": "Name the river."}, {"role": "assistant", "content": "The Sallow."}]}]


def test_cli_usage_help_and_bad_arguments_exit_cleanly(cli):
    code, out, err = cli()
    assert code == 2 and "usage: python -m entrypoints.templating" in err and "MODEL" in err
    for flag in ("--help", "-h"):
        code, out, err = cli(flag)
        assert code == 0 and out.startswith("usage: python -m entrypoints.templating") and "exit codes:" in out
    code, out, err = cli("/no/such/model/dir")
    assert code == 4 and "'/no/such/model/dir' is not a local directory, an s3:// prefix or a Hub id" in err
    code, out, err = cli("x", "--records", "0")
    assert code == 2 and "--records" in err
    assert "Traceback" not in out + err


def test_cli_directory_without_a_tokenizer_is_a_model_error(cli, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    code, out, err = cli(tmp_path)
    assert code == 4 and f"model error: {tmp_path}: no tokenizer files" in err and "Traceback" not in err


def test_cli_shows_what_the_job_trains_on_in_your_data(cli, cache_dir, tmp_path):
    code, out, err = cli(llama2_tokenizer(cache_dir), _data(tmp_path, MINE))
    assert code == 0, err
    assert "chat template:  the Llama 2 chat format" in out
    lines = out.splitlines()
    assert "      <s>[INST] Capital of Veloria? [/INST]" in lines and "TRAIN  Quendar. </s>" in lines
    assert "      <s>[INST] Name the river. [/INST]" in lines and "TRAIN  The Sallow. </s>" in lines
    assert "record 2 of" in out and "format messages" in out

    # Forced templates, as QLORA_CHAT_TEMPLATE and its flag; the Llama 2 format is refused for another vocabulary.
    code, out, err = cli(smollm2(cache_dir), _data(tmp_path, MINE), "--chat-template", "llama-2")
    assert code == 4 and "QLORA_CHAT_TEMPLATE=llama-2 needs a Llama tokenizer" in err
    code, out, err = cli(llama2_tokenizer(cache_dir), "--chat-template", "tokenizer")
    assert code == 4 and "QLORA_CHAT_TEMPLATE=tokenizer needs the tokenizer's own chat template" in err


def test_cli_reads_the_jobs_settings_from_the_environment(cli, cache_dir, tmp_path, monkeypatch):
    code, out, err = cli(smollm2(cache_dir), env={"QLORA_CHAT_TEMPLATE": "llama-2"})
    assert code == 4 and "QLORA_CHAT_TEMPLATE=llama-2 needs a Llama tokenizer" in err
    monkeypatch.delenv("QLORA_CHAT_TEMPLATE")
    code, out, err = cli(llama2_tokenizer(cache_dir), _data(tmp_path, MINE[:1]), "--max-seq-length", "12",
                          env={"QLORA_ASSISTANT_ONLY_LOSS": "false"})
    assert code == 0, err
    assert "--- record 1 of" in out and ": 12 tokens, 12 trained on" in out  # every token, cut at 12
    assert "[cut at max_seq_length=12:" in out
    code, out, err = cli(llama2_tokenizer(cache_dir), _data(tmp_path, [{"text": "Plain words."}]),
                          "--data-format", "text")
    assert code == 0 and "chat template:  none" in out and "TRAIN <s> Plain words.</s>" in out.replace("  ", " ")


def test_cli_bad_record_names_file_and_line(cli, cache_dir, tmp_path):
    data = _data(tmp_path, [MINE[0], {"messages": [{"role": "user", "content": "no answer"}]}])
    code, out, err = cli(llama2_tokenizer(cache_dir), data)
    assert code == 3 and f"{data}:2: no assistant turn" in err and "Traceback" not in err
    code, out, err = cli(llama2_tokenizer(cache_dir), tmp_path / "missing.jsonl")
    assert code == 3 and "missing.jsonl: no such file or directory" in err


def test_cli_token_view_equals_what_the_job_tokenizes(cli, cache_dir, tmp_path):
    """The tool and the job share one tokenization: the ids and masks it prints are the job's training rows."""
    from entrypoints.config import parse_config
    from entrypoints.dataset import prepare_data
    from entrypoints.templating import load_tokenizer_and_template

    data = _data(tmp_path, MINE)
    code, out, err = cli(smollm2(cache_dir), data, "--tokens")
    assert code == 0, err
    shown = [(int(line[6:13]), line.startswith("TRAIN")) for line in out.splitlines()
             if line[:6] in ("TRAIN ", "      ") and line[6:13].strip().isdigit()]
    cfg = parse_config({"QLORA_DATA": str(data), "QLORA_BASE_DIR": str(tmp_path / "ml"), "QLORA_EVAL_FRACTION": "0",
                        "QLORA_MODEL": str(smollm2(cache_dir))})
    tokenizer, template = load_tokenizer_and_template(cfg, smollm2(cache_dir))
    rows = prepare_data(cfg, data, None, tokenizer, template).train
    job = [(i, bool(m)) for row in rows for i, m in zip(row["input_ids"], row["assistant_masks"], strict=True)]
    assert shown == job
