#!/usr/bin/env bash
# The 13B FSDP targets on 2 GPUs, the job's own path (entrypoints.bench.throughput -> load_model + build_trainer with
# the job's parallelism decision), Llama-2-13B shape, every sample 2048 tokens, every GPU capped at 22 GiB:
#   (a) one GPU; (b) FSDP over 2 GPUs, its own plan; (c) FSDP with (a)'s micro-batch (per-GPU memory at equal work);
#   (d) DDP over 2 GPUs (when time is left). GPU 1 meanwhile runs 7B with 16,384-token samples capped at 22 GiB.
# Targets: (b) >= 1.6x (a)'s tokens/s; (c)'s per-GPU peak <= 60% of (a)'s. ~8-9 minutes on 2x H200.
#   bash docs/perf_runs/fsdp-13b.sh
source "$(dirname "$0")/env.sh"
O=$OUT/fsdp-13b; mkdir -p $O
M=/tmp/m13
COMMON=(--shape 13b --model-dir $M --samples 96 --fixed-length 2048 --max-length 2048 --set torch_compile=false)
# GPU 1: 7B with every sample 16,384 tokens, capped at 22 GiB (compile as the default decides)
( CUDA_VISIBLE_DEVICES=1 timeout 330 python3 -m entrypoints.bench.throughput --shape 7b --model-dir /tmp/m7b --samples 24 \
    --fixed-length 16384 --max-length 16384 --runs default@22 --out $O/long16k.json > $O/long16k.log 2>&1
  echo "16k rc=$? $(el)" ) &
# GPU 0: (a) one GPU at 22 GiB (builds the 26 GB bf16 13B checkpoint first)
CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m entrypoints.bench.throughput "${COMMON[@]}" --runs default@22 \
  --out $O/13b-1gpu.json > $O/13b-1gpu.log 2>&1; echo "(a) 1gpu rc=$? $(el)"
wait
MBT=$(python3 -c "import json;r=json.load(open('$O/13b-1gpu.json'))['runs'][0];print(r['plan']['per_device_train_batch_size']*2048)" 2>/dev/null || echo 10240)
echo "one-GPU micro-batch tokens: $MBT"
# (b) FSDP at 22 GiB (its own plan), (c) FSDP with the one-GPU run's micro-batch (memory at equal work per GPU),
# (d) DDP at 22 GiB
run2() { local name=$1; shift
  timeout 170 python3 -m torch.distributed.run --standalone --nproc-per-node=2 -m entrypoints.bench.throughput \
    "${COMMON[@]}" "$@" --out $O/13b-$name.json > $O/13b-$name.log 2>&1; echo "($name) rc=$? $(el)"; }
run2 fsdp --runs default@22 --set parallelism=fsdp
run2 fsdp-samemb --runs default@22 --set parallelism=fsdp --set micro_batch_tokens=$MBT
if (( $(date +%s) - start < 430 )); then run2 ddp --runs default@22 --set parallelism=ddp; else echo "(ddp) skipped: time"; fi
python3 - "$O" <<'PY'
import json, sys
from pathlib import Path
o = Path(sys.argv[1]); s = {}
for n in ("13b-1gpu", "13b-fsdp", "13b-fsdp-samemb", "13b-ddp", "long16k"):
    f = o / f"{n}.json"
    if not f.is_file():
        s[n] = "no report"; continue
    r = json.loads(f.read_text())["runs"][0]
    s[n] = {k: r.get(k) for k in ("tokens_per_second", "peak_allocated_gib", "peak_reserved_gib", "peak_reserved_gib_per_rank",
            "peak_allocated_gib_per_rank", "mfu", "steps", "seconds_per_step", "loss_first", "loss_last", "tokens_per_micro_batch", "error")}
    s[n]["plan"] = {k: v for k, v in (r.get("plan") or {}).items() if k not in ("attn_implementation", "lora_r", "lora_alpha", "packing")}
print(json.dumps(s, indent=1))
PY
cd $OUT && tar czf fsdp-13b.tgz fsdp-13b  # one file to fetch
