#!/usr/bin/env bash
# The persistent compile cache (QLORA_COMPILE_CACHE) on one GPU: the benchmark's 7B shape through the job's
# own trainer, three fresh processes, each with empty TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR (a new container):
#   1. compile_cache=/tmp/cc-store: compiles from scratch and saves the artifacts to the store;
#   2. the same: loads them, so its first optimizer step (which holds the compilation) should be shorter;
#   3. compile_cache=off: the control.
# Prints first_step_seconds, tokens_per_second and compile_cache_loaded of each. ~5-6 minutes on an H200 (the 7B
# random checkpoint is built once, ~1 minute).
#   bash docs/perf_runs/compile-cache.sh
source "$(dirname "$0")/env.sh"
M=/tmp/cc-model-7b; STORE=/tmp/cc-store; rm -rf $STORE /tmp/cc-inductor-* /tmp/cc-triton-*
run() { local name=$1 cache=$2
  TORCHINDUCTOR_CACHE_DIR=/tmp/cc-inductor-$name TRITON_CACHE_DIR=/tmp/cc-triton-$name timeout 200 \
    python3 -m entrypoints.bench.throughput --shape 7b --samples 128 --runs default --model-dir $M \
    --set compile_cache=$cache --out $OUT/compile-cache-$name.json > $OUT/compile-cache-$name.log 2>&1
  echo "$name rc=$? $(el)"; grep -h "compile cache:\|first optimizer step" $OUT/compile-cache-$name.log | cut -c1-220; }
run first $STORE
run second $STORE
run off off
ls -la $STORE
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out, summary = Path(sys.argv[1]), {}
for name in ("first", "second", "off"):
    f = out / f"compile-cache-{name}.json"
    r = json.loads(f.read_text())["runs"][0] if f.is_file() else {"error": "no report (see the log)"}
    summary[name] = {k: r.get(k) for k in ("first_step_seconds", "tokens_per_second", "compile_cache_loaded",
                                           "compile_cache", "load_seconds", "steps", "error")}
(out / "compile-cache-summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
PY
