# Sourced by the scripts here, from the repository root on the GPU machine. The machine must have the job's
# dependencies (torch with CUDA, transformers, peft, accelerate, triton); packages it lacks may be given as wheels in
# .whl/ (bitsandbytes, trl, datasets, liger-kernel, rapidfuzz, ...), installed once into /tmp/site without network.
# Every script writes its JSON reports and logs under $OUT (default /tmp/out) and prints a summary.
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.installed && chmod -R a+rX /tmp/site || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
# NVLink multicast off (the lent 2-GPU machines do not support it); no tokenizer thread pools in forked workers.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
start=$(date +%s); el() { echo "$(( $(date +%s) - start ))s"; }
date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
