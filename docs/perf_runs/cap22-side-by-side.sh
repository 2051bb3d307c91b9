#!/usr/bin/env bash
# At 22 GiB (an A10G's budget) on one GPU, one process, the same 128 samples: the peers (TRL's best
# options with checkpointing; Unsloth when its wheels are in .whl-uns/) and the job's plans capped at 22 GiB:
# every layer recomputed and compiled (ckpt-all@22), some kept and compiled block by block (compile-layers@22), and
# the default (some kept, Liger's kernels), last because Liger patches the process. Decides whether `auto` should
# prefer the all-recomputed compiled plan under a cap. ~7 minutes on an H200.
#   bash docs/perf_runs/cap22-side-by-side.sh
source "$(dirname "$0")/env.sh"
PEERS=trl-best; UNS=()
if ls .whl-uns/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/uns .whl-uns/*.whl \
    && PEERS=trl-best,unsloth && UNS=(--unsloth-path /tmp/uns)
fi
timeout 560 python3 -m entrypoints.bench.throughput --shape 7b --samples 128 --model-dir /tmp/m7b \
  --runs "$PEERS,ckpt-all@22,compile-layers@22,default@22" "${UNS[@]}" --out $OUT/cap22.json > $OUT/cap22.log 2>&1
echo "rc=$? $(el)"; grep -A12 "^| run |" $OUT/cap22.log | cut -c1-250
