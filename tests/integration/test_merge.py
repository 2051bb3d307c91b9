"""The streaming merge against peft on tiny random Llama models: same weights and logits, clear errors.

    PYTHONPATH=$PWD python -m pytest tests/integration/test_merge.py
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from entrypoints import storage  # noqa: E402
from entrypoints.errors import EXIT_CONFIG, EXIT_MODEL, ModelError, OutputExistsError  # noqa: E402
from entrypoints.merge import INDEX_NAME, merge_adapter  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# Merged weights are compared to peft's; a bf16 weight may differ by one rounding step (float32 matmul
# order), a float32 one by float32 noise.
TOLERANCE = {torch.bfloat16: {"rtol": 2**-7, "atol": 1e-6}, torch.float32: {"rtol": 1e-5, "atol": 1e-6}}
IDS = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))


def make_base(root: Path, name: str, *, dtype, tie: bool, hidden: int = 64, layers: int = 2) -> Path:
    torch.manual_seed(1)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=320, tie_word_embeddings=tie)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    out = root / name
    model.save_pretrained(out, max_shard_size="60KB")  # several shards even for a tiny model
    assert len(list(out.glob("*.safetensors"))) >= 2
    (out / "tokenizer_config.json").write_text(json.dumps({"from": "base"}))
    return out


def make_adapter(base_dir: Path, out: Path, *, dtype, seed: int = 0, perturb_saved: bool = True, **lora) -> Path:
    """A peft adapter with random nonzero B (and changed modules_to_save / DoRA magnitudes)."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if perturb_saved and (".modules_to_save." in name or "lora_magnitude_vector" in name):
                param.mul_(1 + 0.3 * torch.rand_like(param))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {
        (torch.bfloat16, False): make_base(root, "bf16", dtype=torch.bfloat16, tie=False),
        (torch.bfloat16, True): make_base(root, "bf16-tied", dtype=torch.bfloat16, tie=True),
        (torch.float32, False): make_base(root, "fp32", dtype=torch.float32, tie=False),
        (torch.float32, True): make_base(root, "fp32-tied", dtype=torch.float32, tie=True),
    }


def logits(model) -> torch.Tensor:
    """float32 logits of a copy (the model itself keeps its dtype)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return copy.deepcopy(model).float()(IDS).logits


def load(path: Path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


CASES = {
    "all-linear": dict(target_modules="all-linear"),
    "subset": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    "lm_head saved": dict(target_modules=["q_proj", "o_proj"], modules_to_save=["lm_head"]),
    "embed saved": dict(target_modules=["k_proj", "up_proj"], modules_to_save=["embed_tokens"]),
    "rslora+patterns": dict(target_modules="all-linear", use_rslora=True, r=4, lora_alpha=16,
                            rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3}),
    "dora": dict(target_modules=["q_proj", "v_proj", "gate_proj"], use_dora=True),
    "embedding lora": dict(target_modules=["embed_tokens", "lm_head", "q_proj"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_merge_matches_peft(bases, tmp_path, case, dtype, tie):
    base_dir = bases[(dtype, tie)]
    adapter_dir = make_adapter(base_dir, tmp_path / "adapter", dtype=dtype, **CASES[case])
    written: list[Path] = []
    seen_then: list[bool] = []

    def on_file_written(path: Path) -> None:
        seen_then.append(path.is_file())
        written.append(path)

    summary = merge_adapter(base_dir, adapter_dir, tmp_path / "merged", merge_into="original",
                            on_file_written=on_file_written)
    out = tmp_path / "merged"
    assert all(seen_then) and written[-1].name == INDEX_NAME and not list(out.glob("*.tmp"))
    assert sorted(p.name for p in written) == sorted(p.name for p in out.iterdir())
    assert summary["lora_modules_merged"] > 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config

    ours = load(out, dtype)
    unmerged = PeftModel.from_pretrained(load(base_dir, dtype), adapter_dir)
    expected_unmerged = logits(unmerged)
    touches_tied_pair = tie and case in ("lm_head saved", "embed saved", "embedding lora")
    assert config["tie_word_embeddings"] == (tie and not touches_tied_pair)
    if case == "embedding lora":
        # With tied embeddings peft's merge_and_unload adds both deltas to the one shared tensor (its merged
        # model no longer computes what the adapter computed; ours unties them), and in bf16 its embedding
        # merge is off by a rounding step here and there: compare with the unmerged model instead.
        assert summary["untied"] == (["lm_head.weight"] if tie else [])
        torch.testing.assert_close(logits(ours), expected_unmerged, rtol=0.02, atol=0.02 * expected_unmerged.abs().max().item())
        return
    reference = unmerged.merge_and_unload()
    ours_sd, ref_sd = ours.state_dict(), reference.state_dict()
    assert ours_sd.keys() == ref_sd.keys()
    for key, expected in ref_sd.items():
        assert ours_sd[key].dtype == dtype, key
        torch.testing.assert_close(ours_sd[key], expected, **TOLERANCE[dtype], msg=lambda m, k=key: f"{k}: {m}")
    torch.testing.assert_close(logits(ours), logits(reference), rtol=1e-3, atol=1e-3)


def test_nf4_merge_equals_dequantized_4bit_weights(bases, tmp_path):
    """merge_into=nf4 writes exactly what the 4-bit model + adapter computes with (bitsandbytes' own dequant)."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    base_dir = bases[(torch.bfloat16, False)]
    adapter_dir = make_adapter(base_dir, tmp_path / "adapter", dtype=torch.bfloat16,
                               target_modules=["q_proj", "v_proj", "down_proj"])
    summary = merge_adapter(base_dir, adapter_dir, tmp_path / "nf4")  # the default
    merge_adapter(base_dir, adapter_dir, tmp_path / "orig", merge_into="original")
    assert summary["weights_requantized"] == 2 * 7  # every decoder Linear was 4-bit in training, not lm_head

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    four_bit = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant, dtype=torch.float32)
    trained = PeftModel.from_pretrained(four_bit, adapter_dir)
    ours = load(tmp_path / "nf4", torch.bfloat16).state_dict()
    checked = 0
    for name, module in trained.base_model.model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            expected = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            lora_layer = trained.base_model.model.get_submodule(name.removesuffix(".base_layer"))
            if name.endswith(".base_layer"):
                expected = expected + lora_layer.get_delta_weight("default").float()
            key = name.removesuffix(".base_layer") + ".weight"
            torch.testing.assert_close(ours[key].float(), expected.to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6)
            checked += 1
    assert checked == 14
    # The nf4 merge reproduces the 4-bit+adapter model far better than the merge into the original base.
    target = logits(trained)
    err_nf4 = (logits(load(tmp_path / "nf4")) - target).abs().max().item()
    err_orig = (logits(load(tmp_path / "orig")) - target).abs().max().item()
    assert err_nf4 < err_orig / 5, (err_nf4, err_orig)


def test_max_shard_size_and_tokenizer_from_adapter(bases, tmp_path):
    base_dir = bases[(torch.float32, False)]
    adapter_dir = make_adapter(base_dir, tmp_path / "adapter", dtype=torch.float32, target_modules="all-linear")
    (adapter_dir / "tokenizer_config.json").write_text(json.dumps({"from": "adapter"}))
    merge_adapter(base_dir, adapter_dir, tmp_path / "one", max_shard_size="10MB")
    merge_adapter(base_dir, adapter_dir, tmp_path / "many", max_shard_size="40KB", merge_into="nf4")
    assert [p.name for p in (tmp_path / "one").glob("*.safetensors")] == ["model.safetensors"]
    assert len(list((tmp_path / "many").glob("*.safetensors"))) >= 4
    assert json.loads((tmp_path / "many" / "tokenizer_config.json").read_text()) == {"from": "adapter"}
    torch.testing.assert_close(logits(load(tmp_path / "one")), logits(load(tmp_path / "many")), rtol=0, atol=0)
    with pytest.raises(OutputExistsError, match="not empty"):
        merge_adapter(base_dir, adapter_dir, tmp_path / "one")


def test_merged_config_names_no_path_of_the_machine_that_made_the_base(bases, tmp_path):
    """A base whose config.json carries `_name_or_path` (written by older transformers: the directory it was loaded
    from) gives a merged config without it, as transformers' own save_pretrained does."""
    import shutil

    base_dir = shutil.copytree(bases[(torch.float32, False)], tmp_path / "base")
    config = json.loads((base_dir / "config.json").read_text())
    (base_dir / "config.json").write_text(json.dumps({**config, "_name_or_path": "/opt/ml/work/base-model"}))
    adapter_dir = make_adapter(base_dir, tmp_path / "adapter", dtype=torch.float32, target_modules=["q_proj"])
    merge_adapter(base_dir, adapter_dir, tmp_path / "merged")
    assert "_name_or_path" not in json.loads((tmp_path / "merged" / "config.json").read_text())


# ------------------------------------------------------------------------------------------------ errors


def _expect_model_error(base_dir, adapter_dir, out: Path, match: str):
    with pytest.raises(ModelError, match=match):
        merge_adapter(base_dir, adapter_dir, out)
    assert not out.exists(), "nothing may be written before the checks pass"


def test_adapter_of_another_base_is_refused_before_writing(bases, tmp_path):
    other = make_base(tmp_path, "wider", dtype=torch.float32, tie=False, hidden=96)
    adapter_dir = make_adapter(other, tmp_path / "adapter", dtype=torch.float32, target_modules="all-linear")
    _expect_model_error(bases[(torch.float32, False)], adapter_dir, tmp_path / "out",
                        r"does not fit the base model.*q_proj.*\[96, 96\].*\[64, 64\]")
    deeper = make_base(tmp_path, "deeper", dtype=torch.float32, tie=False, layers=3)
    adapter_dir = make_adapter(deeper, tmp_path / "adapter3", dtype=torch.float32, target_modules=["q_proj"])
    _expect_model_error(bases[(torch.float32, False)], adapter_dir, tmp_path / "out",
                        r"no weight 'model\.layers\.2\.self_attn\.q_proj\.weight'")


def test_corrupt_missing_and_unsupported_adapters(bases, tmp_path):
    base_dir = bases[(torch.float32, False)]
    good = make_adapter(base_dir, tmp_path / "adapter", dtype=torch.float32, target_modules=["q_proj"])
    weights = good / "adapter_model.safetensors"
    data = weights.read_bytes()
    out = tmp_path / "out"

    weights.write_bytes(data[: len(data) - 100])
    _expect_model_error(base_dir, good, out, r"adapter_model\.safetensors.*does not fit its byte range")
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    _expect_model_error(base_dir, good, out, r"adapter_model\.safetensors is not a valid safetensors file")
    weights.unlink()
    _expect_model_error(base_dir, good, out, r"adapter_model\.safetensors is missing")
    (good / "adapter_model.bin").write_bytes(b"pickle")
    _expect_model_error(base_dir, good, out, r"adapter_model\.bin \(pickle")
    (good / "adapter_model.bin").unlink()
    weights.write_bytes(data)

    config = json.loads((good / "adapter_config.json").read_text())
    for change, match in [
        ({"fan_in_fan_out": True}, "fan_in_fan_out=True"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'.*rewrote the base"),
        ({"peft_type": "IA3"}, "only LoRA adapters"),
        ({"r": 8}, "rank 4 but adapter_config.json says r=8"),
    ]:
        (good / "adapter_config.json").write_text(json.dumps({**config, **change}))
        _expect_model_error(base_dir, good, out, match)
    (good / "adapter_config.json").write_text("{")
    _expect_model_error(base_dir, good, out, "adapter_config.json is not valid JSON")


def test_pickle_base_is_refused(bases, tmp_path):
    src = bases[(torch.float32, False)]
    base_dir = tmp_path / "pickled"
    base_dir.mkdir()
    (base_dir / "config.json").write_text((src / "config.json").read_text())
    torch.save(load(src).state_dict(), base_dir / "pytorch_model.bin")
    adapter_dir = make_adapter(src, tmp_path / "adapter", dtype=torch.float32, target_modules=["q_proj"])
    _expect_model_error(base_dir, adapter_dir, tmp_path / "out", r"pytorch_model\.bin.*pickle.*Convert once")


# ------------------------------------------------------------------------------------------------ CLI


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "entrypoints.merge", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=300)


def test_cli_local_paths_and_exit_code(bases, tmp_path):
    base_dir = bases[(torch.bfloat16, True)]
    adapter_dir = make_adapter(base_dir, tmp_path / "adapter", dtype=torch.bfloat16, target_modules="all-linear")
    done = _cli("--adapter", str(adapter_dir), "--base", str(base_dir), "--output", str(tmp_path / "merged"),
                "--merge-into", "original")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["lora_modules_merged"] == 14
    reference = PeftModel.from_pretrained(load(base_dir, torch.bfloat16), adapter_dir).merge_and_unload()
    torch.testing.assert_close(logits(load(tmp_path / "merged", torch.bfloat16)), logits(reference), rtol=1e-3, atol=1e-3)

    other = make_base(tmp_path, "wider", dtype=torch.bfloat16, tie=True, hidden=96)
    failed = _cli("--adapter", str(adapter_dir), "--base", str(other), "--output", str(tmp_path / "bad"))
    assert failed.returncode == EXIT_MODEL
    assert "model error:" in failed.stderr and "does not fit the base model" in failed.stderr
    assert not (tmp_path / "bad").exists()

    # An output on top of its own inputs deleted the adapter (exit 0) or the base model (exit 1 with a traceback).
    before = {p.name: p.read_bytes() for d in (adapter_dir, base_dir) for p in d.iterdir() if p.is_file()}
    for target in (adapter_dir, base_dir, base_dir.parent):
        refused = _cli("--adapter", str(adapter_dir), "--base", str(base_dir), "--output", str(target), "--overwrite")
        assert refused.returncode == EXIT_CONFIG and "overlap" in refused.stderr and "Traceback" not in refused.stderr
    assert before == {p.name: p.read_bytes() for d in (adapter_dir, base_dir) for p in d.iterdir() if p.is_file()}
    # A missing input is a model error (exit 4), a bad shard size a bad argument (exit 2).
    missing = _cli("--adapter", str(tmp_path / "nope"), "--base", str(base_dir), "--output", str(tmp_path / "m2"))
    assert missing.returncode == EXIT_MODEL and "--adapter" in missing.stderr and "no such directory" in missing.stderr
    size = _cli("--adapter", str(adapter_dir), "--base", str(base_dir), "--output", str(tmp_path / "m3"),
                "--max-shard-size", "5XB")
    assert size.returncode == EXIT_CONFIG and "--max-shard-size '5XB'" in size.stderr


def test_cli_s3_end_to_end(bases, tmp_path, s3_env):
    """Base and adapter in a real S3 server (SeaweedFS); shards streamed in and the result uploaded."""
    server, bucket = s3_env
    base_dir = bases[(torch.bfloat16, False)]
    adapter_dir = make_adapter(base_dir, tmp_path / "adapter", dtype=torch.bfloat16,
                               target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    storage.upload_tree(base_dir, f"s3://{bucket}/models/tiny", endpoint_url=server.endpoint)
    storage.upload_tree(adapter_dir, f"s3://{bucket}/run/adapter", endpoint_url=server.endpoint)
    env = {**server.env(), "QLORA_S3_ENDPOINT_URL": server.endpoint}
    work = tmp_path / "work"
    done = _cli("--adapter", f"s3://{bucket}/run/adapter", "--base", f"s3://{bucket}/models/tiny",
                "--output", f"s3://{bucket}/run/merged", "--work-dir", str(work), "--merge-into", "original",
                env=env)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["uploaded"][-1] == INDEX_NAME
    # Base shards were deleted once merged and the local copies of the output once uploaded.
    assert not list((work / "base").glob("*.safetensors")) and not list(work.glob("merged-*/*"))
    listed = {o.relative for o in storage.list_objects(f"s3://{bucket}/run/merged", endpoint_url=server.endpoint)}
    assert INDEX_NAME in listed and "config.json" in listed and len([n for n in listed if n.endswith(".safetensors")]) >= 2
    merged = storage.fetch(f"s3://{bucket}/run/merged", tmp_path / "got", endpoint_url=server.endpoint)
    reference = PeftModel.from_pretrained(load(base_dir, torch.bfloat16), adapter_dir).merge_and_unload()
    torch.testing.assert_close(logits(load(merged, torch.bfloat16)), logits(reference), rtol=1e-3, atol=1e-3)

    again = _cli("--adapter", f"s3://{bucket}/run/adapter", "--base", f"s3://{bucket}/models/tiny",
                 "--output", f"s3://{bucket}/run/merged", env=env)
    assert again.returncode == 6 and "already holds a merged model" in again.stderr
    # A missing s3:// adapter or base is a model error (exit 4), as a missing local one is, not a storage error (5).
    for flag, args in (("--adapter", (f"s3://{bucket}/run/nope", f"s3://{bucket}/models/tiny")),
                       ("--base", (f"s3://{bucket}/run/adapter", f"s3://{bucket}/models/nope"))):
        missing = _cli("--adapter", args[0], "--base", args[1], "--output", str(tmp_path / "m4"), env=env)
        assert missing.returncode == EXIT_MODEL, missing.stderr
        assert f"{flag} s3://{bucket}/" in missing.stderr and "nothing is stored under this prefix" in missing.stderr
        assert "Traceback" not in missing.stderr


# ------------------------------------------------------------------------------------------------ pre-quantized bases


def make_prequantized_base(source: Path, out: Path, quant_type: str, double_quant: bool) -> Path:
    """`source` loaded in 4 bits by transformers and saved as it is (the form of the `*-bnb-4bit` repositories), in
    several shards."""
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                               bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": "cpu"})
    model.save_pretrained(out, max_shard_size="20KB")
    assert len(list(out.glob("*.safetensors"))) >= 2
    (out / "tokenizer_config.json").write_text((source / "tokenizer_config.json").read_text())
    return out


@pytest.fixture(scope="module")
def prequantized(bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("prequantized")
    return {
        "nf4": make_prequantized_base(bases[(torch.bfloat16, False)], root / "nf4", "nf4", True),
        "fp4-tied": make_prequantized_base(bases[(torch.bfloat16, True)], root / "fp4-tied", "fp4", False),
    }


def dequantized_reference(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """peft's merge_and_unload on the pre-quantized base as transformers dequantizes it (float32)."""
    four_bit = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, device_map={"": "cpu"})
    dequantized = four_bit.dequantize(dtype=torch.float32)
    return PeftModel.from_pretrained(dequantized, adapter_dir).merge_and_unload().state_dict()


@pytest.mark.parametrize(("base", "case"), [("nf4", "all-linear"), ("nf4", "dora"), ("fp4-tied", "lm_head saved")])
def test_prequantized_base_merge_equals_peft_on_the_dequantized_model(prequantized, tmp_path, base, case):
    """A bitsandbytes 4-bit base: its stored weights dequantized with bitsandbytes' own functions plus the delta, a bf16
    model equal (one rounding step) to peft's merge into the dequantized model; nothing quantized again."""
    base_dir = prequantized[base]
    adapter_dir = make_adapter(base_dir, tmp_path / "adapter", dtype=torch.bfloat16, **CASES[case])
    summary = merge_adapter(base_dir, adapter_dir, tmp_path / "merged")  # the job's default merge_into, nf4
    assert summary["weights_dequantized"] == 14 and summary["weights_requantized"] == 0
    assert summary["base_stored"] == ("bitsandbytes nf4, double quantization on" if base == "nf4" else
                                      "bitsandbytes fp4, double quantization off")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is False

    ours = load(tmp_path / "merged", torch.bfloat16).state_dict()
    reference = dequantized_reference(base_dir, adapter_dir)
    assert ours.keys() == reference.keys()
    for key, expected in reference.items():
        assert ours[key].dtype == torch.bfloat16, key
        torch.testing.assert_close(ours[key].float(), expected.to(torch.bfloat16).float(), **TOLERANCE[torch.bfloat16],
                                   msg=lambda m, k=key: f"{k}: {m}")


def test_prequantized_base_merge_into_original_is_refused(prequantized, tmp_path, capsys, caplog):
    from entrypoints.merge import main

    base_dir = prequantized["nf4"]
    adapter_dir = make_adapter(base_dir, tmp_path / "adapter", dtype=torch.bfloat16, target_modules=["q_proj"])
    code = main(["--adapter", str(adapter_dir), "--base", str(base_dir), "--output", str(tmp_path / "m"),
                 "--merge-into", "original"])
    err = capsys.readouterr().err + caplog.text
    assert code == EXIT_CONFIG, err
    assert "is a pre-quantized checkpoint (bitsandbytes nf4, double quantization on) with no 16-bit weights" in err
    assert "Traceback" not in err and not (tmp_path / "m").exists()


def test_cli_prequantized_base_from_s3(prequantized, tmp_path, s3_env):
    """A pre-quantized base in S3: its shards fetched one at a time (a 4-bit weight's parts may sit in another shard
    than its packed values), dequantized, merged, uploaded."""
    import shutil

    from safetensors.torch import load_file, save_file

    server, bucket = s3_env
    base_dir = shutil.copytree(prequantized["fp4-tied"], tmp_path / "base")
    # transformers keeps a weight's parts in its shard; another tool may not: q_proj's state goes to a shard of its own.
    index = json.loads((base_dir / INDEX_NAME).read_text())
    weight = "model.layers.0.self_attn.q_proj.weight"
    shard = base_dir / index["weight_map"][weight]
    tensors = load_file(shard)
    moved = {k: tensors.pop(k) for k in list(tensors) if k.startswith(weight + ".")}
    save_file(tensors, shard, metadata={"format": "pt"})
    save_file(moved, base_dir / "model-state.safetensors", metadata={"format": "pt"})
    index["weight_map"].update({k: "model-state.safetensors" for k in moved})
    (base_dir / INDEX_NAME).write_text(json.dumps(index))
    adapter_dir = make_adapter(base_dir, tmp_path / "adapter", dtype=torch.bfloat16, target_modules="all-linear")
    storage.upload_tree(base_dir, f"s3://{bucket}/models/tiny-bnb-4bit", endpoint_url=server.endpoint)
    storage.upload_tree(adapter_dir, f"s3://{bucket}/run/adapter", endpoint_url=server.endpoint)
    work = tmp_path / "work"
    done = _cli("--adapter", f"s3://{bucket}/run/adapter", "--base", f"s3://{bucket}/models/tiny-bnb-4bit",
                "--output", f"s3://{bucket}/run/merged", "--work-dir", str(work),
                env={**server.env(), "QLORA_S3_ENDPOINT_URL": server.endpoint})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["weights_dequantized"] == 14
    assert not list((work / "base").glob("*.safetensors"))
    merged = storage.fetch(f"s3://{bucket}/run/merged", tmp_path / "got", endpoint_url=server.endpoint)
    ours = load(merged, torch.bfloat16).state_dict()
    for key, expected in dequantized_reference(base_dir, adapter_dir).items():
        torch.testing.assert_close(ours[key].float(), expected.to(torch.bfloat16).float(), **TOLERANCE[torch.bfloat16],
                                   msg=lambda m, k=key: f"{k}: {m}")
