"""The streaming merge on tiny random T5 models (v1.0: ReLU, tied head; v1.1/Flan: gated, a head of its own)
against peft's merge_and_unload: the same weights and logits.

    PYTHONPATH=$PWD python -m pytest tests/integration/test_merge_t5.py
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForSeq2SeqLM  # noqa: E402

from entrypoints.merge import merge_adapter  # noqa: E402

from ..t5_models import tiny_t5  # noqa: E402

TOLERANCE = {torch.bfloat16: {"rtol": 2**-7, "atol": 1e-6}, torch.float32: {"rtol": 1e-5, "atol": 1e-6}}
GENERATOR = torch.Generator().manual_seed(0)
IDS = torch.randint(3, 259, (2, 12), generator=GENERATOR)
DECODER_IDS = torch.randint(3, 259, (2, 6), generator=GENERATOR)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5-bases")
    return {(version, dtype): tiny_t5(root / f"{version}-{str(dtype)[6:]}", version, dtype=dtype, max_shard_size="60KB")
            for version, dtype in (("v1.0", torch.float32), ("v1.1", torch.float32), ("v1.1", torch.bfloat16))}


def load(path: Path, dtype=torch.float32):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype)


def logits(model) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return copy.deepcopy(model).float().eval()(input_ids=IDS, decoder_input_ids=DECODER_IDS).logits


def make_adapter(base_dir: Path, out: Path, dtype, **lora) -> Path:
    """A peft adapter with random nonzero B, and a changed copy of each module it saves whole."""
    torch.manual_seed(0)
    model = get_peft_model(load(base_dir, dtype), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                             task_type="SEQ_2_SEQ_LM", **lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.mul_(1 + 0.3 * torch.rand_like(param))
    model.save_pretrained(out)
    return out


CASES = {
    "all-linear": dict(target_modules="all-linear"),
    "subset": dict(target_modules=["q", "v", "wo", "EncDecAttention.k"]),
    "lm_head saved": dict(target_modules=["q", "o"], modules_to_save=["lm_head"]),
}
RUNS = [(("v1.0", torch.float32), case) for case in CASES] + [(("v1.1", torch.float32), case) for case in CASES] + [
    (("v1.1", torch.bfloat16), "all-linear")]


@pytest.mark.parametrize(("base", "case"), RUNS, ids=[f"{v}-{str(d)[6:]}-{c}" for (v, d), c in RUNS])
def test_t5_merge_matches_peft(bases, tmp_path, base, case):
    version, dtype = base
    base_dir = bases[base]
    adapter_dir = make_adapter(base_dir, tmp_path / "adapter", dtype, **CASES[case])
    summary = merge_adapter(base_dir, adapter_dir, tmp_path / "merged", merge_into="original")
    out = tmp_path / "merged"
    config = json.loads((out / "config.json").read_text())
    feed_forward = 3 if version == "v1.1" else 2  # wi_0, wi_1, wo or wi, wo
    # Two encoder layers (4 attention linears each) and two decoder layers (8: self and cross attention).
    expected_modules = {"all-linear": 2 * (4 + feed_forward) + 2 * (8 + feed_forward), "subset": 6 + 6 + 4 + 2,
                        "lm_head saved": 6 + 6}[case]
    assert summary["lora_modules_merged"] == expected_modules
    # The v1.0 head shares the `shared` embedding: replacing it unties the pair, and the decoder's output scaling,
    # which T5 derives from tie_word_embeddings, must stay as it was (the merged model scaled nothing before).
    assert summary["untied"] == (["lm_head.weight"] if version == "v1.0" and case == "lm_head saved" else [])
    if summary["untied"]:
        assert config["tie_word_embeddings"] is False and config["scale_decoder_outputs"] is True

    ours = load(out, dtype)
    reference = PeftModel.from_pretrained(load(base_dir, dtype), adapter_dir).merge_and_unload()
    ours_sd, ref_sd = ours.state_dict(), reference.state_dict()
    assert ours_sd.keys() == ref_sd.keys()
    for key, expected in ref_sd.items():
        assert ours_sd[key].dtype == dtype, key
        torch.testing.assert_close(ours_sd[key], expected, **TOLERANCE[dtype], msg=lambda m, k=key: f"{k}: {m}")
    torch.testing.assert_close(logits(ours), logits(reference), rtol=1e-3, atol=1e-3)
    assert not torch.allclose(logits(ours), logits(load(base_dir, dtype)), atol=1e-3)  # the adapter did something


def test_t5_nf4_merge_equals_dequantized_4bit_weights(bases, tmp_path):
    """merge_into=nf4 round-trips exactly the weights the 4-bit T5 held in training: its q/k/v/o and wi layers, not
    `wo` (which transformers keeps in 16 bits for T5) nor the head."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    base_dir = bases[("v1.1", torch.float32)]
    adapter_dir = make_adapter(base_dir, tmp_path / "adapter", torch.float32, target_modules="all-linear")
    summary = merge_adapter(base_dir, adapter_dir, tmp_path / "nf4")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        four_bit = AutoModelForSeq2SeqLM.from_pretrained(base_dir, quantization_config=quant, dtype=torch.float32)
    trained = PeftModel.from_pretrained(four_bit, adapter_dir)
    ours = load(tmp_path / "nf4").state_dict()
    checked = 0
    for name, module in trained.base_model.model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            assert not name.removesuffix(".base_layer").endswith((".wo", "lm_head")), name
            expected = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            lora_layer = trained.base_model.model.get_submodule(name.removesuffix(".base_layer"))
            expected = expected + lora_layer.get_delta_weight("default").float()
            torch.testing.assert_close(ours[name.removesuffix(".base_layer") + ".weight"], expected, rtol=1e-5,
                                       atol=1e-6)
            checked += 1
    assert checked == summary["weights_requantized"] == 2 * (4 + 2) + 2 * (8 + 2)  # encoder + decoder layers
