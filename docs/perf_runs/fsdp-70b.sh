#!/usr/bin/env bash
# 70B over 2 GPUs: FSDP from the benchmark's nf4 checkpoint (written directly in 4-bit: 36 GB instead of
# 138) at the smallest per-GPU cap the job's memory model allows (35 GiB; 40 if that fails), the first FSDP run of a
# pre-quantized base on GPUs; then the 2-GPU tests of tests/gpu on the current code. ~9 minutes on 2x H200.
#   bash docs/perf_runs/fsdp-70b.sh
source "$(dirname "$0")/env.sh"
O=$OUT/fsdp-70b; mkdir -p $O
M=/tmp/m70-nf4
[ -f $M/config.json ] || { timeout 200 python3 -m entrypoints.bench.prequantize --shape 70b --out $M > $O/70b-build.log 2>&1; echo "build rc=$? $(el)"; }
for cap in 35 40; do
  timeout 240 python3 -m torch.distributed.run --standalone --nproc-per-node=2 -m entrypoints.bench.throughput \
    --shape 70b --model-dir $M --samples 96 --runs default@$cap --set parallelism=fsdp --set torch_compile=false \
    --out $O/70b-fsdp-$cap.json > $O/70b-fsdp-$cap.log 2>&1
  rc=$?; echo "70b fsdp cap=$cap rc=$rc $(el)"; grep -h "tokens_per_second\|Error\|refus" $O/70b-fsdp-$cap.log | tail -3 | cut -c1-300
  [ $rc = 0 ] && break
done
timeout $(( 560 - ($(date +%s) - start) )) python3 -m pytest tests/gpu -q -p no:cacheprovider -rs -k "two_gpus or multi_gpu" \
  > $O/gpu-tests-2gpu.log 2>&1; echo "2-GPU tests rc=$? $(el)"; tail -3 $O/gpu-tests-2gpu.log
cd $OUT && tar czf fsdp-70b.tgz fsdp-70b  # one file to fetch
