"""Tiny random T5 models for tests, with a byte-level tokenizer that needs no download.

Two layouts, as real checkpoints have them:
- `v1.0` (t5-small...): ReLU feed-forward (`wi`, `wo`), the LM head tied to the `shared` embedding (not stored), and
  the decoder's output scaled by d_model**-0.5 before the head;
- `v1.1` (Flan-T5, mT5...): gated-GELU feed-forward (`wi_0`, `wi_1`, `wo`), an LM head of its own (`lm_head.weight`
  stored, `tie_word_embeddings: false` in config.json), no output scaling.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ("<pad>", "</s>", "<unk>")  # T5's ids: pad 0 (also the decoder's start token), EOS 1, unknown 2


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges (every byte one token) that appends EOS, as T5's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIALS, *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_input_names=["input_ids", "attention_mask"])


def tiny_t5(out: Path, version: str = "v1.1", *, dtype=None, d_model: int = 64, layers: int = 2,
            max_shard_size: str | None = None, seed: int = 0) -> Path:
    """Save a random T5 of the given layout (and the byte tokenizer) to `out`."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=layers,
                      num_decoder_layers=layers, num_heads=4, dropout_rate=0.0,
                      feed_forward_proj="relu" if version == "v1.0" else "gated-gelu",
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = T5ForConditionalGeneration(config)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(out)
    if version == "v1.1":
        # transformers 5 always ties T5's head on save; a v1.1 checkpoint stores its own (and says so in config.json).
        shards = sorted(out.glob("*.safetensors"))
        last = load_file(str(shards[-1]))
        shared = model.shared.weight.detach()
        last["lm_head.weight"] = (torch.randn_like(shared.float()) * shared.float().std()).to(shared.dtype)
        save_file(last, str(shards[-1]), metadata={"format": "pt"})
        index = out / "model.safetensors.index.json"
        if index.is_file():
            data = json.loads(index.read_text())
            data["weight_map"]["lm_head.weight"] = shards[-1].name
            index.write_text(json.dumps(data))
    # As the configs of real checkpoints are (written before transformers 5): the scaling of the decoder's output is
    # implied by tie_word_embeddings, false for v1.1 and absent (true) for v1.0.
    settings = json.loads((out / "config.json").read_text())
    settings.pop("scale_decoder_outputs", None)
    settings.pop("tie_word_embeddings", None)
    if version == "v1.1":
        settings["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(settings, indent=2))
    return out
