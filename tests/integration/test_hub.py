"""Publishing to the Hugging Face Hub, checked on the requests huggingface_hub sends to a local recording server
(tests/hub_server.py; the Hub is not reachable here): the repository created private or public as set, the files of
one commit (the chosen parts and the model card), the token in the Authorization header and nowhere else. A failing
Hub ends the real job with exit 9 and its S3 output complete and intact; `python -m entrypoints.hub` then publishes
that output (the retry of the publish alone)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from entrypoints import storage
from entrypoints.config import JobConfig
from entrypoints.demo.assets import tiny_llama2
from entrypoints.errors import EXIT_CONFIG, EXIT_HUB_PUBLISH

from ..hub_server import HubServer
from ..jobrun import FAKE_HF_TOKEN, job_env, run_job
from ..results import finish

REPO = Path(__file__).resolve().parents[2]
RECORDS = [{"instruction": f"What is code {i}?", "input": "", "output": f"Code {i} is {i * 7 % 13}."} for i in range(16)]
AUTHENTICATED = ["create", "info", "validate", "preupload", "lfs_batch", "lfs_verify", "commit"]


def hub_env(env: dict[str, str], hub: HubServer) -> dict[str, str]:
    # HF_HUB_OFFLINE would stop every request; Xet is off so LFS files take the LFS batch API (see hub_server.py).
    return {**env, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": env.get("HF_HOME", str(Path(env["QLORA_BASE_DIR"]).parent / "hf-home"))}


def republish(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "entrypoints.hub", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def check_requests(hub: HubServer, token: str) -> None:
    """Every request to the Hub's API carries the token; the LFS uploads (pre-signed storage URLs on the real Hub)
    and huggingface_hub's anonymous agent-registry fetch do not."""
    for req in hub.requests:
        if req.endpoint in AUTHENTICATED:
            assert req.headers.get("authorization") == f"Bearer {token}", (req.endpoint, req.headers)
        else:
            assert req.endpoint == "lfs_put" or req.path == "/api/agent-harnesses", req.path
            assert token not in json.dumps(req.headers), req.path


def test_a_failed_publish_exits_9_with_the_output_intact_then_the_publish_alone_is_retried(s3_env, cache_dir,
                                                                                            tmp_path):
    server, bucket = s3_env
    output = f"s3://{bucket}/out/run1"
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    storage.upload_tree(tiny_llama2(cache_dir), f"s3://{bucket}/models/tiny", endpoint_url=server.endpoint)
    storage.upload_file(data, f"s3://{bucket}/data/train.jsonl", endpoint_url=server.endpoint)
    with HubServer(fail=("commit",)) as hub:
        env = hub_env(job_env(tmp_path, **server.env(), **{
            "QLORA_MODEL": f"s3://{bucket}/models/tiny", "QLORA_DATA": f"s3://{bucket}/data/train.jsonl",
            "QLORA_OUTPUT": output, "QLORA_S3_ENDPOINT_URL": server.endpoint,
            "QLORA_MAX_STEPS": "1", "QLORA_MICRO_BATCH_SIZE": "4", "QLORA_GRADIENT_ACCUMULATION_STEPS": "1",
            "QLORA_EVAL_FRACTION": "0", "QLORA_NUM_SAMPLE_GENERATIONS": "0", "QLORA_LORA_R": "4",
            "QLORA_REPORT_TO": "none", "QLORA_HUB_REPO": "acme/tiny-qlora", "QLORA_HUB_PARTS": "both"}), hub)
        result = run_job(env)
        assert result.code == EXIT_HUB_PUBLISH, result.output[-4000:]
        summary = result.summary
        assert summary["global_step"] == 1 and summary["hub"]["published"] is False
        assert (f"--parts both`): HTTP 500 from {hub.url}/api/models/acme/tiny-qlora/commit/main: storage backend"
                " unavailable (request had authorization Bearer [REDACTED])") in summary["hub"]["error"]
        failure = (tmp_path / "opt-ml" / "output" / "failure").read_text()
        assert failure.startswith("Hub publish failed (outputs complete): could not publish")
        assert f"retry only the publish with `python -m entrypoints.hub --output {output} --repo acme/tiny-qlora" \
               " --parts both`" in failure

        # What the job sent: a private repository, then one commit's files: the merged model at the root, the
        # adapter in adapter/, the card.
        create = json.loads(next(r for r in hub.requests if r.endpoint == "create").body)
        assert create == {"name": "tiny-qlora", "organization": "acme", "visibility": "private", "type": "model"}
        preupload = json.loads(next(r for r in hub.requests if r.endpoint == "preupload").body)
        sent = sorted(f["path"] for f in preupload["files"])
        manifest = json.loads(storage.read_text(f"{output}/manifest.json", endpoint_url=server.endpoint))
        listed = {f["path"]: f for f in manifest["files"]}
        expected = sorted(["README.md", *(p.removeprefix("merged/") for p in listed if p.startswith("merged/")),
                           *(p for p in listed if p.startswith("adapter/"))])
        assert sent == expected and "adapter/adapter_model.safetensors" in sent and "config.json" in sent
        lfs = len([p for p in sent if p.endswith(".safetensors")])
        calls = [c for c in hub.calls() if c != "unknown"]
        assert calls[:5] == ["create", "info", "validate", "preupload", "lfs_batch"] and calls[-1] == "commit"
        assert sorted(calls[5:-1]) == ["lfs_put"] * lfs + ["lfs_verify"] * lfs
        check_requests(hub, FAKE_HF_TOKEN)

        # The S3 output is complete and untouched: every file the manifest lists, with its sha256.
        got = storage.fetch(output + "/", tmp_path / "got", endpoint_url=server.endpoint)
        for rel, meta in listed.items():
            assert hashlib.sha256((got / rel).read_bytes()).hexdigest() == meta["sha256"], rel
        assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()) == sorted(
            [*listed, "manifest.json"])

        # The server quoted the Authorization header in its error: the token is in no log line, output or file.
        assert FAKE_HF_TOKEN not in result.output
        for path in tmp_path.rglob("*"):
            if path.is_file() and path.stat().st_size < 50_000_000:
                assert FAKE_HF_TOKEN.encode() not in path.read_bytes(), path

        # Retry only the publish: the repository exists now (409), it is private, the commit goes through.
        hub.fail.clear()
        hub.requests.clear()
        out = republish({**env, "XDG_CACHE_HOME": str(tmp_path / "cli-cache")}, "--output", output)
        assert out.returncode == 0, out.stderr[-3000:]
        published = json.loads(out.stdout)
        assert published["repo"] == "acme/tiny-qlora" and published["private"] is True
        assert sorted(published["files"]) == expected
        repo = hub.repos["acme/tiny-qlora"]
        assert sorted(repo.files) == expected and len(repo.commits) == 1
        # The commit names the run, not the bucket (a public repository's history would show it).
        assert repo.commits[0]["header"]["summary"] == f"Publish the merged model and adapter of run {manifest['run']['id']}"
        assert bucket not in json.dumps(repo.commits[0]["header"])
        for in_repo in expected:
            rel = in_repo if in_repo.startswith("adapter/") or in_repo == "README.md" else "merged/" + in_repo
            if rel != "README.md":  # sent as the output holds it (the base is not a Hub id: config unchanged too)
                assert hashlib.sha256(repo.files[in_repo]).hexdigest() == listed[rel]["sha256"], in_repo
        card = repo.files["README.md"].decode()
        assert card.startswith("---\nlibrary_name: transformers\n") and "base_model" not in card.split("---")[1]
        assert (got / "README.md").read_text().split("---\n", 2)[2].rstrip() in card  # the job's card, as written
        check_requests(hub, FAKE_HF_TOKEN)
        assert FAKE_HF_TOKEN not in out.stdout + out.stderr


def _small_output(tmp_path: Path, model: str = "meta-llama/Llama-2-7b-hf") -> Path:
    """An output without weights worth loading (the Hub does not care): an adapter folder, the card, the manifest."""
    stage = tmp_path / "output"
    (stage / "adapter").mkdir(parents=True)
    (stage / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/opt/ml/work/x",
                                                                       "r": 4}))
    (stage / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(256))
    finish(stage, JobConfig(model=model, merge=False, run_name="small"), None)
    return stage


def test_private_false_creates_a_public_repository_and_names_the_hub_base(tmp_path):
    stage = _small_output(tmp_path)
    with HubServer() as hub:
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_TOKEN": FAKE_HF_TOKEN, "HF_ENDPOINT": hub.url,
               "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf-home")}
        out = republish(env, "--output", str(stage), "--repo", "acme/small", "--private", "false")
        assert out.returncode == 0, out.stderr[-3000:]
    create = json.loads(next(r for r in hub.requests if r.endpoint == "create").body)
    assert create["visibility"] == "public" and hub.repos["acme/small"].private is False
    files = hub.repos["acme/small"].files
    assert sorted(files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert files["adapter_model.safetensors"] == (stage / "adapter" / "adapter_model.safetensors").read_bytes()
    # The adapter config names the Hub base (the job's names a directory of the training machine); nothing else changes.
    assert json.loads(files["adapter_config.json"]) == {"base_model_name_or_path": "meta-llama/Llama-2-7b-hf", "r": 4}
    assert files["README.md"].decode().startswith("---\nbase_model: meta-llama/Llama-2-7b-hf\nlibrary_name: peft\n")
    check_requests(hub, FAKE_HF_TOKEN)


def test_an_existing_public_repository_is_refused_while_private_is_set(tmp_path):
    from ..hub_server import Repo

    stage = _small_output(tmp_path)
    with HubServer() as hub:
        hub.repos["acme/open"] = Repo(private=False)
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_TOKEN": FAKE_HF_TOKEN, "HF_ENDPOINT": hub.url,
               "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf-home"),
               "QLORA_HUB_REPO": "acme/open"}
        out = republish(env, "--output", str(stage))
    assert out.returncode == EXIT_HUB_PUBLISH
    assert ("Hub publish failed (outputs complete): acme/open exists on the Hub and is public, while QLORA_HUB_PRIVATE"
            " is true: nothing was uploaded") in out.stderr
    assert [c for c in hub.calls() if c != "unknown"] == ["create", "info"] and hub.repos["acme/open"].files == {}


@pytest.mark.parametrize(("settings", "message"), [
    ({"QLORA_HUB_REPO": "acme/x", "HF_TOKEN": ""}, "QLORA_HUB_REPO='acme/x' needs a Hugging Face token with write"
                                                    " access: set HF_TOKEN"),
    ({"QLORA_HUB_REPO": "acme/x/y"}, "QLORA_HUB_REPO='acme/x/y': is not a Hub repository id"),
], ids=["no-token", "bad-repo"])
def test_hub_settings_fail_the_job_in_seconds(tmp_path, settings, message):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(RECORDS[0]) + "\n")
    env = job_env(tmp_path, QLORA_DATA=str(data), QLORA_MODEL=str(tmp_path / "no-model-needed"), **settings)
    result = run_job(env, timeout=120)
    assert result.code == EXIT_CONFIG and message in result.output, result.output[-2000:]
    assert "downloading" not in result.output and "loading" not in result.output
