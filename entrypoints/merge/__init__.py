"""Merge a LoRA adapter into its base model tensor by tensor, at constant memory, uploading as it goes.

    python -m entrypoints.merge --adapter s3://bucket/run/adapter --base s3://bucket/models/llama-2-7b \
        --output s3://bucket/run/merged [--merge-into nf4|fp4|original] [--max-shard-size 5GB]

peft's `merge_and_unload` needs the whole 16-bit model in memory (13.5 GB for 7B, 140 GB for 70B). Here
each base tensor is read on its own (plain reads at the offsets of the safetensors header, no mmap, so
the resident set never grows with the shard), the LoRA delta scale * B @ A is added in float32 a block of
rows at a time (on the GPU when there is one) and the result is written, in the base dtype, straight into
the output shard. Peak memory is about one tensor plus the adapter, whatever the model size.

`merge_into`: `original` adds the delta to the 16-bit base weights; `nf4`/`fp4` first round-trip every
weight that was 4-bit in training through bitsandbytes' quantize/dequantize, i.e. merge into the base
as the adapter saw it. See docs/MERGE.md for the measured difference and why the default is what
it is. A pre-quantized (bitsandbytes 4-bit) base has no 16-bit weights: its stored weights are dequantized
(bitsandbytes' own dequantize_4bit) and the delta added to them.

Every adapter key and shape is checked against the base's safetensors headers (or, for an s3:// base,
against its index and config) before any output is written.

The parts, each importing only those above it:
- `safetensors_io`: headers, single tensors, files written tensor by tensor and atomically.
- `adapter`: the peft adapter, read and checked (`load_adapter`).
- `layout`: the base's config and headers, the adapter-fits-base check, the output shard plan (`plan_shards`).
- `core`: the 4-bit round trip, adding a delta, and the streaming pipeline (`merge_adapter`).
- `cli`: the standalone job with s3:// inputs and outputs (`run_merge`, `main`).
"""

from entrypoints.merge.cli import build_parser, main, run_merge
from entrypoints.merge.core import BLOCK_ELEMENTS, DEFAULT_MERGE_INTO, MERGE_INTO_CHOICES, merge_adapter
from entrypoints.merge.layout import INDEX_NAME, SINGLE_NAME
from entrypoints.merge.safetensors_io import read_header, read_tensor, write_safetensors

__all__ = [
    "BLOCK_ELEMENTS", "DEFAULT_MERGE_INTO", "INDEX_NAME", "MERGE_INTO_CHOICES", "SINGLE_NAME", "build_parser",
    "main", "merge_adapter", "read_header", "read_tensor", "run_merge", "write_safetensors",
]
