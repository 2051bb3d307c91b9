#!/usr/bin/env bash
# Build the job image and push it to the ECR repository of infra/cloudformation.yaml.
#   bash infra/build_and_push.sh [--dry-run] [--tag TAG] [--repository NAME] [--region REGION] [--builder docker|buildah]
# Builds linux/amd64 from any machine (an Apple-silicon laptop too): SageMaker's and the EKS GPU nodes' CPUs are
# x86_64 and the image's package lock is x86_64-only. docker: `docker buildx` (Docker Desktop emulates amd64);
# buildah: `--platform linux/amd64` (on a non-x86 Linux host it needs qemu-user-static's binfmt handlers).
# The tag defaults to the git commit (the repository's tags are immutable, so a tag is never reused).
# --dry-run prints the commands instead of running them (needs no Docker, AWS or network).
set -euo pipefail

repository="qlora-job"
region="${AWS_REGION:-${AWS_DEFAULT_REGION:-}}"
tag=""
builder="docker"
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --tag) tag="$2"; shift ;;
    --repository) repository="$2"; shift ;;
    --region) region="$2"; shift ;;
    --builder) builder="$2"; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.."
if [ -z "$tag" ]; then
  tag="$(git rev-parse --short=12 HEAD 2>/dev/null || true)"
  if [ -z "$tag" ]; then
    echo "no --tag given and not in a git checkout" >&2
    exit 2
  fi
  if [ -n "$(git status --porcelain 2>/dev/null)" ]; then
    tag="${tag}-dirty-$(date -u +%Y%m%d%H%M%S)"
  fi
fi
case "$builder" in docker|buildah) ;; *) echo "--builder must be docker or buildah" >&2; exit 2 ;; esac

if [ "$dry_run" = 1 ]; then
  account="${AWS_ACCOUNT_ID:-111122223333}"
  region="${region:-us-east-1}"
else
  if [ -z "$region" ]; then
    echo "no region: pass --region or set AWS_REGION" >&2
    exit 2
  fi
  account="$(aws sts get-caller-identity --query Account --output text)"
fi
registry="${account}.dkr.ecr.${region}.amazonaws.com"
# The cloud's architecture, whatever this machine's is.
platform="linux/amd64"
image="${registry}/${repository}:${tag}"

run() {
  if [ "$dry_run" = 1 ]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

login() {
  # The password goes through a pipe, never a command line or a log.
  if [ "$dry_run" = 1 ]; then
    echo "+ aws ecr get-login-password --region ${region} | ${builder} login --username AWS --password-stdin ${registry}"
  else
    aws ecr get-login-password --region "$region" | "$builder" login --username AWS --password-stdin "$registry"
  fi
}

login
if [ "$builder" = docker ]; then
  # buildx builds for --platform on any host and pushes in the same step. --provenance=false: one image
  # manifest, not an index with an attestation (what every puller understands).
  run docker buildx build --platform "$platform" --provenance=false --file Dockerfile --tag "$image" --push .
else
  run buildah build --platform "$platform" --file Dockerfile --tag "$image" .
  run buildah push "$image"
fi
echo "image: ${image} (${platform})"
echo "next: python launch/submit.py --instance g5.2xlarge --image ${image} ..."
