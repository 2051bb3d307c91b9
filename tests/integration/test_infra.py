"""infra/: cfn-lint on every CloudFormation file, kubernetes-validate --strict on every manifest, the kustomize
base complete and in sync with the launcher, and the image script's syntax and dry run.

    PYTHONPATH=$PWD python -m pytest tests/integration/test_infra.py
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "kubernetes"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def cloudformation_files() -> list[Path]:
    return [p for p in INFRA.rglob("*.y*ml") if "AWSTemplateFormatVersion" in p.read_text()]


def test_cloudformation_passes_cfn_lint():
    files = cloudformation_files()
    assert files, "no CloudFormation template found under infra/"
    proc = subprocess.run([tool("cfn-lint"), *map(str, files)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cloudformation_has_the_promised_properties():
    class Loader(yaml.SafeLoader):
        pass

    # CloudFormation's short-form functions (!Sub, !Ref, ...) as plain values.
    Loader.add_multi_constructor("!", lambda loader, suffix, node: (
        loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode) else
        loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else loader.construct_mapping(node)))
    template = yaml.load((INFRA / "cloudformation.yaml").read_text(), Loader=Loader)
    res = template["Resources"]
    bucket = res["Bucket"]["Properties"]
    assert bucket["VersioningConfiguration"]["Status"] == "Enabled"
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    repo = res["Repository"]["Properties"]
    assert repo["ImageTagMutability"] == "IMMUTABLE" and repo["ImageScanningConfiguration"]["ScanOnPush"] is True
    statements = [s for p in res["ExecutionRole"]["Properties"]["Policies"] if isinstance(p, dict) and "PolicyName" in p
                  for s in p["PolicyDocument"]["Statement"]]
    by_sid = {s["Sid"]: s for s in statements}
    assert by_sid["ReadInputs"]["Action"] == "s3:GetObject"
    assert not any("s3:PutObject" in str(s["Action"]) and "data/" in str(s["Resource"]) for s in statements)
    assert by_sid["ReadTheJobSecret"]["Resource"] == "JobSecret"
    assert "*" not in str([s["Action"] for s in statements])  # no wildcard actions
    assert {"ExecutionRoleArn", "SchedulerRoleArn", "RepositoryUri", "SecretArn", "BucketUri"} <= set(template["Outputs"])


def test_every_kubernetes_manifest_passes_kubernetes_validate_strict():
    files = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
    proc = subprocess.run([tool("kubernetes-validate"), "--strict", "--kubernetes-version", "1.30.0", *map(str, files)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ERROR" not in proc.stdout, proc.stdout + proc.stderr


def test_kustomization_lists_every_manifest_and_builds(tmp_path):
    """`kubectl apply -k infra/kubernetes` sets up the namespace, service account and RBAC, and starts nothing: no Job
    or CronJob with a placeholder image and bucket that would bring up a GPU node (they live in examples/)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    kinds = {d["kind"] for name in files for d in yaml.safe_load_all((K8S / name).read_text()) if d}
    assert kinds == {"Namespace", "ServiceAccount", "Role", "RoleBinding"}
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return  # the file list above is the check without kustomize
    built = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    out = tmp_path / "built.yaml"
    out.write_text(built.stdout)
    proc = subprocess.run([tool("kubernetes-validate"), "--strict", "--kubernetes-version", "1.30.0", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ERROR" not in proc.stdout, proc.stdout
    assert {d["kind"] for d in yaml.safe_load_all(built.stdout)} == {"Namespace", "ServiceAccount", "Role", "RoleBinding"}


@pytest.mark.parametrize("name", ["job.yaml", "cronjob.yaml"])
def test_templates_are_what_the_launcher_generates(name):
    path = K8S / "examples" / name
    header = path.read_text().splitlines()[0]
    assert header.startswith("# Generated; do not edit. Regenerate: python ")
    command = header.split("Regenerate: python ", 1)[1].split(" > ")[0]
    proc = subprocess.run([sys.executable, *shlex.split(command)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert list(yaml.safe_load_all(proc.stdout)) == list(yaml.safe_load_all(path.read_text())), \
        f"{path} is stale: run the command in its first line"


def test_build_script_syntax_lint_and_dry_run():
    script = INFRA / "build_and_push.sh"
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0
    if shutil.which("shellcheck"):
        lint = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, timeout=60)
        assert lint.returncode == 0, lint.stdout
    proc = subprocess.run(["bash", str(script), "--dry-run", "--tag", "abc123", "--region", "eu-west-1"],
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    image = "111122223333.dkr.ecr.eu-west-1.amazonaws.com/qlora-job:abc123"
    # linux/amd64 whatever the host: SageMaker and x86 GPU nodes cannot run an arm64 image, and the lock is x86_64-only.
    assert proc.stdout.splitlines()[:3] == [
        "+ aws ecr get-login-password --region eu-west-1 | docker login --username AWS --password-stdin"
        " 111122223333.dkr.ecr.eu-west-1.amazonaws.com",
        f"+ docker buildx build --platform linux/amd64 --provenance=false --file Dockerfile --tag {image} --push .",
        f"image: {image} (linux/amd64)"]
    buildah = subprocess.run(["bash", str(script), "--dry-run", "--tag", "abc123", "--region", "eu-west-1", "--builder",
                              "buildah"], capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert buildah.returncode == 0, buildah.stderr
    assert buildah.stdout.splitlines()[1:3] == [
        f"+ buildah build --platform linux/amd64 --file Dockerfile --tag {image} .", f"+ buildah push {image}"]
    helped = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert "linux/amd64" in helped.stdout
    bad = subprocess.run(["bash", str(script), "--dry-run", "--nonsense"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr
