"""Encoder-decoder (T5-class) models: conversation -> (input, target), the settings that do not apply, the model's
kind, the LoRA target check, the trainer arguments and the launcher's estimate, without training.

    PYTHONPATH=$PWD python -m pytest tests/unit/test_seq2seq.py
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from entrypoints import sizing
from entrypoints.config import JobConfig, parse_config, seq2seq_config
from entrypoints.errors import ConfigError, DataError, ModelError

from ..t5_models import byte_tokenizer, tiny_t5

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


def test_a_conversation_becomes_input_and_target_text():
    from entrypoints.templating import seq2seq_input, seq2seq_pair

    # The last answer is the target; the turns before it, earlier answers included, one `role: text` line each.
    assert seq2seq_pair(CONV) == ("system: Be brief.\nuser: Hi!\nassistant: Hello.\nuser: 2+2?", "4")
    # A lone question is its text alone, as Flan-T5 was instruction-tuned.
    assert seq2seq_pair(CONV[1:3]) == ("Hi!", "Hello.")
    assert seq2seq_pair([CONV[0], *CONV[1:3]]) == ("system: Be brief.\nuser: Hi!", "Hello.")
    assert seq2seq_input(CONV[1:2]) == "Hi!"


def test_input_and_target_tokens_each_end_with_one_eos(cache_dir):
    from transformers import AutoTokenizer

    from entrypoints.demo.assets import llama2_tokenizer
    from entrypoints.templating import seq2seq_prompt_ids, tokenize_seq2seq

    tok = byte_tokenizer()  # appends EOS itself, as T5's tokenizer does
    enc = tokenize_seq2seq(tok, CONV[1:3])
    assert tok.decode(enc["input_ids"]) == "Hi!</s>" and tok.decode(enc["labels"]) == "Hello.</s>"
    assert enc["input_ids"].count(tok.eos_token_id) == 1 and enc["labels"].count(tok.eos_token_id) == 1
    assert seq2seq_prompt_ids(tok, CONV[:4]) == tokenize_seq2seq(tok, CONV)["input_ids"]
    llama = AutoTokenizer.from_pretrained(llama2_tokenizer(cache_dir))  # adds BOS, no EOS: the EOS is appended
    enc = tokenize_seq2seq(llama, CONV[1:3])
    assert enc["labels"][-1] == llama.eos_token_id and enc["labels"].count(llama.eos_token_id) == 1
    assert llama.decode(enc["labels"], skip_special_tokens=True) == "Hello."


def _cfg(tmp_path, argv=(), **env):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    return parse_config({"QLORA_DATA": str(data), "QLORA_BASE_DIR": str(tmp_path / "ml"), **env}, argv)


def test_settings_that_do_not_apply_are_ignored_at_their_defaults_and_refused_when_given(tmp_path):
    effective, ignored = seq2seq_config(_cfg(tmp_path))
    assert ignored == ["packing", "chat_template", "use_liger", "torch_compile"]
    assert effective.packing is False and effective.use_liger is False and effective.torch_compile == "false" and effective.compute_dtype == "auto"
    # Given at the value seq2seq training works with: accepted as it is.
    effective, ignored = seq2seq_config(_cfg(tmp_path, QLORA_PACKING="false", QLORA_COMPUTE_DTYPE="float32"))
    assert ignored == ["chat_template", "use_liger", "torch_compile"] and effective.compute_dtype == "float32"
    # Given at a value that asks for what seq2seq training does not do: refused, each named where it was given.
    hp = tmp_path / "ml" / "input" / "config" / "hyperparameters.json"
    hp.parent.mkdir(parents=True)
    hp.write_text(json.dumps({"use_liger": True}))
    with pytest.raises(ConfigError) as err:
        seq2seq_config(_cfg(tmp_path, ["--chat-template", "tokenizer"], QLORA_PACKING="true",
                            QLORA_COMPUTE_DTYPE="float16", QLORA_DATA_FORMAT="text"))
    text = str(err.value)
    assert err.value.exit_code == 2 and len(err.value.problems) == 5, text
    for phrase in ("QLORA_PACKING=true", "--chat-template=tokenizer", "QLORA_COMPUTE_DTYPE=float16",
                   "QLORA_DATA_FORMAT=text", f"{hp} key 'use_liger'=true", "set it to false",
                   "or set it to auto or bfloat16 or float32", "overflow in float16"):
        assert phrase in text, phrase
    # A configuration built in code (nothing given) only has defaults to ignore.
    assert seq2seq_config(JobConfig(data="x", packing=True))[1] == ["packing", "chat_template", "use_liger", "torch_compile"]


def _config_dir(tmp_path, name: str, config: dict):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_t5_class_models_are_admitted_and_other_encoder_decoders_refused(tmp_path):
    from entrypoints.modeling import is_seq2seq

    cfg = _cfg(tmp_path)
    for model_type in sizing.SEQ2SEQ_MODEL_TYPES:
        assert is_seq2seq(_config_dir(tmp_path, model_type, {"model_type": model_type, "d_model": 64}), cfg)
    assert not is_seq2seq(_config_dir(tmp_path, "llama", {"model_type": "llama", "hidden_size": 64}), cfg)
    bart = _config_dir(tmp_path, "bart", {"model_type": "bart", "d_model": 64, "is_encoder_decoder": True})
    with pytest.raises(ModelError, match=r"bart/config.json: an encoder-decoder model of type 'bart'.*t5, mt5, umt5"):
        is_seq2seq(bart, cfg)


def test_no_memory_estimate_for_encoder_decoders_and_the_launcher_says_so(tmp_path, capsys):
    from launch import submit

    model = tiny_t5(tmp_path / "t5")
    config = json.loads((model / "config.json").read_text())
    assert sizing.is_encoder_decoder(config)
    with pytest.raises(ValueError, match="encoder-decoder model .model_type t5.: the memory estimate"):
        sizing.shape_of_model(str(model))
    # The launcher crashed with a traceback on any config.json the memory model does not describe.
    assert submit.main(["--instance", "g5.2xlarge", "--set", f"model={model}", "--dry-run"]) == 0
    assert "GPU memory check skipped" in capsys.readouterr().err


def test_lora_targets_are_checked_against_t5_module_names():
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from entrypoints.trainer import check_lora_targets

    with torch.device("meta"):
        model = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=64, d_kv=8, d_ff=128, num_layers=1,
                                                    num_heads=4, feed_forward_proj="gated-gelu"))
    check_lora_targets(model, ["q", "v", "wi_0", "wo"])
    with pytest.raises(ConfigError, match=r"query match no module.*linear modules are k, o, q, v, wi_0, wi_1, wo \("):
        check_lora_targets(model, ["q", "query"])


def test_trainer_arguments_are_the_jobs_less_trl_data_arguments():
    from transformers import Seq2SeqTrainingArguments

    from entrypoints.trainer import SFT_DATA_ARGUMENTS, seq2seq_config, sft_config

    cfg = JobConfig(data="x", packing=False, micro_batch_size=3)
    sft = sft_config(cfg, None, cuda=False, precision="bfloat16", has_eval=True, report_to="none")
    args = seq2seq_config(sft)
    names = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments)}
    assert set(args) - {"gradient_checkpointing"} <= names  # renamed to the name this transformers knows
    assert not set(SFT_DATA_ARGUMENTS) & set(args)
    assert args["per_device_train_batch_size"] == 3 and args["include_num_input_tokens_seen"] == "non_padding"


def test_records_without_a_prompt_and_answer_are_bad_records(tmp_path):
    from entrypoints.dataset import prepare_data

    good = {"messages": CONV}
    last_unweighted = {"messages": [*CONV[:4], {"role": "assistant", "content": "4", "weight": 0}]}
    data = tmp_path / "train.jsonl"
    cfg = dataclasses.replace(_cfg(tmp_path, QLORA_EVAL_FRACTION="0", QLORA_MAX_BAD_RECORDS="1"), packing=False)
    data.write_text(json.dumps(good) + "\n" + json.dumps(last_unweighted) + "\n" + json.dumps(good) + "\n")
    prepared = prepare_data(cfg, data, None, byte_tokenizer(), None, seq2seq=True)
    assert prepared.train.column_names == ["input_ids", "labels"] and len(prepared.train) == 2
    assert prepared.stats["bad_records_skipped"] == 1
    # Loss tokens are the target's ("4" and EOS); trained tokens are input and target.
    source = len(b"system: Be brief.\nuser: Hi!\nassistant: Hello.\nuser: 2+2?") + 1
    assert prepared.stats["train_loss_tokens"] == 2 * 2 and prepared.stats["train_tokens"] == 2 * (source + 2)
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "plain"}) + "\n")
    with pytest.raises(DataError, match=r"text.jsonl:1: a plain `text` record has no prompt and answer"):
        prepare_data(dataclasses.replace(cfg, max_bad_records=0), text, None, byte_tokenizer(), None, seq2seq=True)


def test_batched_answers_equal_answers_one_by_one(tmp_path):
    """The encoder's inputs are padded on the right and masked: a short prompt beside a long one answers as alone."""
    from tokenizers import decoders
    from transformers import AutoModelForSeq2SeqLM

    from entrypoints.evaluation import generate_answers

    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5(tmp_path / "t5", "v1.1")).train()
    tok = byte_tokenizer()
    tok.backend_tokenizer.decoder = decoders.Fuse()  # one visible character per token: a random model's bytes are
    samples = [{"messages": CONV[1:2]}, {"messages": CONV[:4]}]  # rarely valid UTF-8
    together = generate_answers(model, tok, None, samples, max_new_tokens=6, seq2seq=True)
    alone = [generate_answers(model, tok, None, [s], max_new_tokens=6, seq2seq=True)[0] for s in samples]
    assert together == alone and together[0] != together[1], (together, alone)
    assert model.training  # left as it was found
    assert generate_answers(model, tok, None, samples, max_new_tokens=6) == []  # no chat template, not seq2seq
