#!/usr/bin/env bash
# Builds the repository's Dockerfile here, without a Docker engine or a registry, then checks the image and
# runs the job's demo inside it.
#   bash container/build-local.sh            # as root; needs: apt-get install -y buildah debootstrap
#
# The Dockerfile is used as it is; only its BASE_IMAGE build argument changes: a Debian 12 root file system
# made by debootstrap (no registry is reachable here) stands in for debian:bookworm-slim. buildah runs
# with --isolation chroot --storage-driver vfs, which need no daemon, no overlay and no user namespaces.
# Environment: WORK_DIR (default /var/tmp/qlora-build) holds the base root file system and the pip config;
# IMAGE (default localhost/qlora-job:local) names the result; SKIP_DEMO=1 stops after the checks;
# SKIP_BUILD=1 reruns the checks and the demo on the image built last time; DEMO_ARGS are passed to the demo
# (e.g. DEMO_ARGS="--set QLORA_NUM_EPOCHS=2" on a busy machine: the full demo is 80 steps on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."

WORK_DIR=${WORK_DIR:-/var/tmp/qlora-build}
IMAGE=${IMAGE:-localhost/qlora-job:local}
BASE=localhost/qlora-base:bookworm
buildah=(buildah --storage-driver vfs)

step() { printf '\n== %s\n' "$*"; }
die() { echo "build-local: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (buildah's chroot isolation and debootstrap need it)"
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || die "$tool is missing: apt-get install -y buildah debootstrap"
done
mkdir -p "$WORK_DIR"

# ---------------------------------------------------------------- the base image: Debian 12 from debootstrap
if ! "${buildah[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
  step "base image $BASE (debootstrap bookworm, minbase)"
  # The Debian mirror this machine's apt already uses (no other source is reachable).
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list)
  rootfs="$WORK_DIR/rootfs"
  if [ ! -x "$rootfs/usr/bin/apt-get" ]; then
    rm -rf "$rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror"
  fi
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  ctr=$("${buildah[@]}" from scratch)
  mnt=$("${buildah[@]}" mount "$ctr")
  # /dev and /proc are provided by the runtime; everything else is the image.
  tar -C "$rootfs" --exclude=./dev --exclude=./proc --exclude=./sys -cf - . | tar -C "$mnt" -xf -
  mkdir -p "$mnt/dev" "$mnt/proc" "$mnt/sys"
  "${buildah[@]}" umount "$ctr" >/dev/null
  "${buildah[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd bash "$ctr"
  "${buildah[@]}" commit --quiet --rm "$ctr" "$BASE" >/dev/null
fi

# ---------------------------------------------------------------- pip's network settings, for the build only
# pip inside the build reaches the package index through this machine's TLS setup, so it needs the host's
# CA bundle. Both are mounted read-only into each RUN step; neither is copied into any image layer.
host_ca=$(python3 -c 'import ssl; print(ssl.get_default_verify_paths().cafile or "")' 2>/dev/null || true)
[ -f "$host_ca" ] || host_ca=/etc/ssl/certs/ca-certificates.crt
printf '[global]\ncert = /etc/pip-build-ca.crt\ntimeout = 180\n' > "$WORK_DIR/pip.conf"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
step "build $IMAGE from ./Dockerfile (BASE_IMAGE=$BASE)"
start=$(date +%s)
# --format docker: what `docker build` produces (the OCI format drops the SHELL instruction's setting).
"${buildah[@]}" bud --isolation chroot --layers=false --format docker \
  --build-arg BASE_IMAGE="$BASE" \
  --build-arg VERSION="$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])' 2>/dev/null || echo 0.0.0)" \
  --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  --volume "$WORK_DIR/pip.conf:/etc/pip.conf:ro" \
  --volume "$host_ca:/etc/pip-build-ca.crt:ro" \
  -f Dockerfile -t "$IMAGE" .
echo "build took $(( $(date +%s) - start )) s"
fi

# ---------------------------------------------------------------- checks of the built image
step "image size"
size=$("${buildah[@]}" images --format '{{.Size}}' "$IMAGE")
echo "image $IMAGE: $size"
config=$("${buildah[@]}" inspect --type image "$IMAGE")
entrypoint=$(python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["OCIv1"]["config"]["Entrypoint"]))' <<<"$config")
python3 -c '
import json, sys
c = json.load(sys.stdin)["OCIv1"]["config"]
print("entrypoint:", json.dumps(c["Entrypoint"]), "cmd:", json.dumps(c.get("Cmd")), "user:", repr(c.get("User", "")))
for key, value in sorted(c.get("Labels", {}).items()):
    print(f"label {key}={value}")' <<<"$config"

ctr=$("${buildah[@]}" from --quiet "$IMAGE")
cleanup() { "${buildah[@]}" rm "$ctr" >/dev/null 2>&1 || true; }
trap cleanup EXIT
run() { "${buildah[@]}" run --isolation chroot "$@"; }
# The image's own ENTRYPOINT, as a platform would start it (buildah run does not apply it by itself).
mapfile -t ep < <(python3 -c 'import json, sys; print("\n".join(json.loads(sys.argv[1])))' "$entrypoint")

mnt=$("${buildah[@]}" mount "$ctr")
step "largest folders of the image"
site="$mnt/opt/venv/lib/python3.11/site-packages"
# One du per folder: du counts a file once per run, so folders in one run would hide each other.
{ du -sm "$mnt"; du -sm "$mnt/usr"; du -m -d 1 "$site"; du -m -d 1 "$site/nvidia"; } 2>/dev/null \
  | sort -rn | uniq | awk '$1 >= 80' | sed "s#$mnt##; s#^\([0-9]*\)\t\$#\1\t/#"
"${buildah[@]}" umount "$ctr" >/dev/null

step "a C compiler for Triton and nothing else to build with; no caches in the final stage"
# shellcheck disable=SC2016 # the script is expanded by the image's shell, not this one
run "$ctr" -- sh -c 'found=0
command -v gcc >/dev/null || { echo "missing: gcc (Triton builds its launcher with it)"; found=1; }
for tool in c++ g++ clang make; do
  if command -v "$tool" >/dev/null; then echo "found build tool: $tool"; found=1; fi
done
for dir in /root/.cache /home/app/.cache /var/lib/apt/lists/partial /src; do
  if [ -n "$(ls -A "$dir" 2>/dev/null)" ]; then echo "found leftover: $dir"; found=1; fi
done
if ls /var/cache/apt/archives/*.deb >/dev/null 2>&1; then echo "found .deb files"; found=1; fi
[ "$found" = 0 ] && echo "ok: gcc for Triton, no other build tool, no pip/apt cache, no build sources"
exit "$found"'

step "Triton builds a C launcher as uid 1000 and caches it under /tmp (what torch.compile and Liger need)"
# The same call Triton makes for each kernel's launcher: a Python extension compiled with the image's gcc and
# Python headers into TRITON_CACHE_DIR (the image sets it below /tmp). No GPU is needed to build one.
# shellcheck disable=SC2016 # Python source
run --user 1000:1000 "$ctr" -- python -c '
import os
from triton.runtime.build import compile_module_from_src
src = ("#include <Python.h>\nstatic struct PyModuleDef m = {PyModuleDef_HEAD_INIT, \"qlora_triton_probe\", NULL, -1, NULL};\n"
       "PyMODINIT_FUNC PyInit_qlora_triton_probe(void) { return PyModule_Create(&m); }\n")
mod = compile_module_from_src(src=src, name="qlora_triton_probe")
assert mod.__file__.startswith(os.environ["TRITON_CACHE_DIR"]), mod.__file__
print("ok: Triton built", mod.__file__)'

step "the same with a read-only root file system: /tmp and /opt/ml the only writable places (Kubernetes' readOnlyRootFilesystem)"
# buildah run has no read-only root, so this step starts the image's file system by hand: a private mount
# namespace, the root bind-mounted read-only, empty tmpfs volumes at /tmp and /opt/ml (the emptyDir volumes of the
# Kubernetes manifest), the image's own environment, uid 1000. Then Triton builds a launcher, the job's libraries
# import, and a write outside the volumes fails with EROFS (read-only file system), not merely EACCES.
mapfile -t image_env < <(python3 -c 'import json, sys; print("\n".join(json.load(sys.stdin)["OCIv1"]["config"]["Env"]))' <<<"$config")
mnt=$("${buildah[@]}" mount "$ctr")
# shellcheck disable=SC2016 # the first script is expanded by the namespace's sh, the second is Python source
unshare --mount --propagation private sh -c '
set -e
root=$1; shift
mount --bind "$root" "$root" && mount -o remount,bind,ro "$root"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
mount -t tmpfs -o mode=0755,uid=1000,gid=1000 tmpfs "$root/opt/ml"
mount -t proc proc "$root/proc" && mount --rbind /dev "$root/dev"
exec chroot --userspec=1000:1000 "$root" /usr/bin/env -i "$@"' sh "$mnt" "${image_env[@]}" HOME=/home/app \
  /opt/venv/bin/python -c '
import errno, os
from triton.runtime.build import compile_module_from_src
src = ("#include <Python.h>\nstatic struct PyModuleDef m = {PyModuleDef_HEAD_INIT, \"qlora_triton_ro\", NULL, -1, NULL};\n"
       "PyMODINIT_FUNC PyInit_qlora_triton_ro(void) { return PyModule_Create(&m); }\n")
mod = compile_module_from_src(src=src, name="qlora_triton_ro")
assert mod.__file__.startswith(os.environ["TRITON_CACHE_DIR"] + "/"), mod.__file__
import entrypoints.train, torch, transformers, peft, trl, bitsandbytes, datasets, accelerate, wandb, liger_kernel
for path in ("/opt/venv/qlora-probe", "/home/app/qlora-probe", "/var/tmp/qlora-probe"):
    try:
        open(path, "w").close()
    except OSError as exc:
        assert exc.errno == errno.EROFS, (path, exc)
    else:
        raise SystemExit(f"{path} is writable: the root file system is not read-only")
print("ok: read-only root, uid", os.getuid(), "- Triton built", mod.__file__, "and the job imports")' \
  || die "Triton or the job's imports failed with a read-only root file system (log above)"
"${buildah[@]}" umount "$ctr" >/dev/null

step "the job's libraries import; bitsandbytes' CUDA library loads (as uid 1000, as Kubernetes starts it)"
# shellcheck disable=SC2016 # Python source
run --user 1000:1000 "$ctr" -- python -c '
import ctypes, pathlib
import entrypoints.config, torch, transformers, peft, trl, bitsandbytes, datasets, accelerate, wandb
print("torch", torch.__version__, "CUDA", torch.version.cuda, "| transformers", transformers.__version__,
      "| peft", peft.__version__, "| trl", trl.__version__, "| bitsandbytes", bitsandbytes.__version__)
lib = pathlib.Path(bitsandbytes.__file__).parent / ("libbitsandbytes_cuda" + torch.version.cuda.replace(".", "") + ".so")
ctypes.CDLL(str(lib))  # its libcudart/libcublas come from the nvidia-*-cu12 wheels that torch loaded
print("ok: loaded", lib.name)'

step "the entrypoint drops root to uid 1000 (started as root, as SageMaker and docker run do)"
run "$ctr" -- "${ep[@]}" --dry-run train
# shellcheck disable=SC2016 # Python source
run --user 0:0 "$ctr" -- "${ep[@]:0:3}" /opt/venv/bin/python -c '
import os, subprocess, sys
# The entrypoint execs the job through setpriv; the job here is `id`, run the same way.
cmd = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "--no-new-privs", "--", "id", "-u"]
uid = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
print("setpriv as the entrypoint runs it -> uid", uid)
sys.exit(0 if uid == "1000" else 1)'

if python3 - <<'EOF' 2>/dev/null
import importlib.util, sys
sys.path.insert(0, ".")
sys.exit(0 if importlib.util.find_spec("entrypoints.train") else 1)
EOF
then
  step "the job itself runs as uid 1000: a train run without data fails with a config error, as uid 1000"
  set +e
  run "$ctr" -- "${ep[@]}" train
  rc=$?
  set -e
  echo "train without QLORA_DATA exited $rc (2 = configuration error)"
  run "$ctr" -- sh -c 'stat -c "failure file %n: owner uid %u" /opt/ml/output/failure && head -c 300 /opt/ml/output/failure; echo'
  owner=$(run "$ctr" -- stat -c %u /opt/ml/output/failure)
  if [ "$rc" != 2 ] || [ "$owner" != 1000 ]; then
    die "expected exit 2 and a failure file written by uid 1000 (got $rc, $owner)"
  fi
  echo "ok: the job ran as uid 1000"
  run "$ctr" -- rm -f /opt/ml/output/failure
fi

if [ "${SKIP_DEMO:-0}" != 1 ]; then
  if python3 -c 'import importlib.util, sys; sys.path.insert(0, "."); sys.exit(0 if importlib.util.find_spec("entrypoints.demo") else 1)'; then
    step "the demo, inside the image, through its entrypoint"
    # The demo fetches its small model with `pip download` (no model hub is reachable here), so pip in the
    # container gets the host's CA bundle, as the build did. Nothing else of the host is visible.
    # shellcheck disable=SC2086 # DEMO_ARGS is a list of words
    run --volume "$host_ca:/etc/demo-ca.crt:ro" --env PIP_CERT=/etc/demo-ca.crt "$ctr" -- "${ep[@]}" demo ${DEMO_ARGS:-}
    echo "demo files written by uid $(run "$ctr" -- stat -c %u /tmp/.demo/job.log) (the job's user)"
  else
    echo "entrypoints.demo is not in this checkout yet: demo skipped"
  fi
fi
step "done: $IMAGE ($size)"
