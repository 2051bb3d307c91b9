"""What config.json says about how a checkpoint stores its weights (entrypoints/bnb4bit.py), without tensors.

    PYTHONPATH=$PWD python -m pytest tests/unit/test_bnb4bit.py
"""

from __future__ import annotations

import pytest

from entrypoints.bnb4bit import Stored4bit, groups, packed_bytes, stored_quantization
from entrypoints.errors import EXIT_MODEL, ModelError

BNB = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
       "bnb_4bit_use_double_quant": True}


def test_the_stored_form_is_read_from_quantization_config():
    assert stored_quantization({"dtype": "bfloat16"}) is None
    assert stored_quantization({"quantization_config": {"quant_method": "gguf"}}) is None  # float tensors
    assert stored_quantization({"quantization_config": BNB, "dtype": "float16"}) == Stored4bit("nf4", True, "float16")
    # Older transformers wrote no quant_method; the type defaults to transformers' own default, fp4.
    assert stored_quantization({"quantization_config": {"load_in_4bit": True}}) == Stored4bit("fp4", False)
    assert stored_quantization({"quantization_config": {**BNB, "bnb_4bit_quant_type": "fp4",
                                                        "bnb_4bit_use_double_quant": False}}).describe() \
        == "bitsandbytes fp4, double quantization off"


@pytest.mark.parametrize(("quant", "says"), [
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bitsandbytes 8-bit (LLM.int8)"),
    ({"quant_method": "gptq", "bits": 4}, "'gptq'"),
    ({"quant_method": "awq", "bits": 4}, "'awq'"),
    ({**BNB, "bnb_4bit_quant_type": "int4"}, "bnb_4bit_quant_type='int4'"),
])
def test_other_quantizations_are_model_errors_naming_the_method(quant, says):
    with pytest.raises(ModelError, match="config.json") as info:
        stored_quantization({"quantization_config": quant}, "m/config.json")
    assert says in str(info.value) and info.value.exit_code == EXIT_MODEL


def test_stored_weights_are_told_by_their_names_and_sizes():
    keys = ["a.weight", "a.weight.absmax", "a.weight.quant_map", "a.weight.quant_state.bitsandbytes__nf4",
            "norm.weight", "b.weight.quant_state.bitsandbytes__int3"]
    assert groups(keys) == {"a.weight": {"weight": "a.weight", "quant_state": "a.weight.quant_state.bitsandbytes__nf4",
                                         "absmax": "a.weight.absmax", "quant_map": "a.weight.quant_map"}}
    # bitsandbytes' quantize_4bit: two 4-bit values a byte, in ((n + 1) // (2 * itemsize)) elements of the storage.
    assert packed_bytes(128 * 128, 1) == 8192 and packed_bytes(128 * 128, 2) == 8192 and packed_bytes(7, 1) == 4
