"""The chat's generation settings: a flag wins, then the model's generation_config.json, then the defaults."""

import pytest
from transformers import GenerationConfig

from entrypoints.chat.session import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    generation_settings,
)
from entrypoints.errors import ConfigError


def test_defaults_when_neither_flag_nor_generation_config_sets_a_value():
    s = generation_settings(GenerationConfig(bos_token_id=1, eos_token_id=2), None, None, None)
    assert (s.temperature, s.top_p, s.max_new_tokens) == (DEFAULT_TEMPERATURE, DEFAULT_TOP_P, DEFAULT_MAX_NEW_TOKENS)
    assert s.kwargs() == {"do_sample": True, "temperature": DEFAULT_TEMPERATURE, "top_p": DEFAULT_TOP_P}


def test_the_model_generation_config_then_the_flags():
    config = GenerationConfig(do_sample=True, temperature=0.3, top_p=0.8, max_new_tokens=64)
    s = generation_settings(config, None, None, None)
    assert (s.temperature, s.top_p, s.max_new_tokens) == (0.3, 0.8, 64)
    s = generation_settings(config, 1.2, 0.5, 10)
    assert (s.temperature, s.top_p, s.max_new_tokens) == (1.2, 0.5, 10)


def test_temperature_zero_or_a_greedy_generation_config_is_greedy():
    assert generation_settings(None, 0.0, None, None).kwargs()["do_sample"] is False
    s = generation_settings(GenerationConfig(do_sample=False), None, None, None)
    assert s.greedy and s.kwargs() == {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def test_bad_values_name_the_flag():
    with pytest.raises(ConfigError) as err:
        generation_settings(None, -1.0, 1.5, 0)
    assert err.value.problems == ["--temperature=-1.0: must be 0 (greedy) or more",
                                  "--top-p=1.5: must be above 0 and at most 1",
                                  "--max-new-tokens=0: must be 1 or more"]


def test_an_encoder_decoder_is_prompted_as_the_job_trained_it(tmp_path):
    """Chat renders a T5-class model's prompt with the job's own seq2seq input (one `role: text` line per turn,
    the system prompt included), not a chat-only variant of it."""
    from entrypoints.chat.session import LoadedModel, prompt_ids
    from entrypoints.templating import seq2seq_pair
    from tests.t5_models import byte_tokenizer

    tokenizer = byte_tokenizer()
    loaded = LoadedModel(model=None, tokenizer=tokenizer, template=None, encoder_decoder=True, context_tokens=None)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    trained_input, _ = seq2seq_pair([*messages, {"role": "assistant", "content": "Paris"}])
    assert tokenizer.decode(prompt_ids(loaded, messages), skip_special_tokens=True) == trained_input
    assert trained_input == "system: Be brief.\nuser: Capital of France?"
