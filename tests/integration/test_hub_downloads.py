"""The job against a Hugging Face Hub: a local HTTP server that answers like the Hub (or fails), reached through
HF_ENDPOINT, with the real job in its own process.

- a Hub that cannot be reached, or answers with a server error or rate limiting, is a storage error (exit 5,
  "maybe retry"); a Hub that answers "no such model" or "gated" is a model error (exit 4, "do not retry");
- downloads land in huggingface_hub's cache under HF_HOME (the image's HF_HOME is the documented cache volume),
  and a rerun with the same model downloads nothing.
"""

from __future__ import annotations

import json
import socket

import pytest

from entrypoints.demo.assets import tiny_llama2
from entrypoints.errors import EXIT_DATA, EXIT_MODEL, EXIT_STORAGE

from ..hub_download_server import COMMIT, FakeHub
from ..jobrun import FAKE_HF_TOKEN, job_env, run_job

REPO_ID = "acme/tiny-llama"
GOOD = {"messages": [{"role": "user", "content": "Capital of Veloria?"}, {"role": "assistant", "content": "Quendar."}]}


def _env(tmp_path, hub_endpoint: str, data: dict) -> dict[str, str]:
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(data) + "\n" for _ in range(8)))
    return job_env(tmp_path, **{
        "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub_endpoint, "HF_HOME": str(tmp_path / "hf-home"),
        "QLORA_MODEL": REPO_ID, "QLORA_DATA": str(tmp_path / "train.jsonl"), "QLORA_OUTPUT": str(tmp_path / "out"),
        "QLORA_REPORT_TO": "none",
    })


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: nothing listens there


CASES = [
    # (name, how the Hub fails, exit code, words of the message)
    ("server error", (503, {}), EXIT_STORAGE, "could not be reached to download acme/tiny-llama (HTTP 503)"),
    ("rate limited", (429, {}), EXIT_STORAGE, "could not be reached to download acme/tiny-llama (HTTP 429)"),
    ("connection dropped", "disconnect", EXIT_STORAGE, "could not be reached to download acme/tiny-llama"),
    ("nothing listening", "refused", EXIT_STORAGE, "could not be reached to download acme/tiny-llama (ConnectError"),
    ("no such model", (404, {"X-Error-Code": "RepoNotFound"}), EXIT_MODEL, "acme/tiny-llama was not found on the Hub"),
    ("gated without access", (401, {"X-Error-Code": "GatedRepo"}), EXIT_MODEL, "acme/tiny-llama is gated"),
    # HF_HUB_OFFLINE=1 is the user's choice, not an outage: a model not in the cache then is a model error.
    ("offline mode", "offline", EXIT_MODEL, "could not download acme/tiny-llama from the Hub"),
]


@pytest.mark.parametrize("failure, code, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hub_failures_exit_with_the_documented_code(tmp_path, failure, code, words):
    with FakeHub(REPO_ID) as hub:
        env = _env(tmp_path, hub.endpoint, GOOD)
        if failure == "refused":
            env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
        elif failure == "offline":
            env["HF_HUB_OFFLINE"] = "1"
        else:
            hub.fail_with(*failure) if isinstance(failure, tuple) else hub.fail_with(failure)
        result = run_job(env, timeout=120)
    if failure == "offline":
        assert hub.requests == []
    assert result.code == code, result.output[-3000:]
    assert words in result.output, result.output[-3000:]
    assert "Traceback" not in result.output
    failure_file = (tmp_path / "opt-ml" / "output" / "failure").read_text()
    assert failure_file.startswith("storage error:" if code == EXIT_STORAGE else "model error:") and words in failure_file
    if code == EXIT_STORAGE:
        assert "a rerun may succeed" in failure_file
    assert FAKE_HF_TOKEN not in result.output


def test_hub_downloads_are_cached_in_hf_home_and_reused(tmp_path, cache_dir):
    """Two runs with the same HF_HOME (a volume mounted there, as container/README.md's recipe does): the first
    downloads the model into HF_HOME, the second downloads nothing. Each run stops at the data (a record without an
    answer, exit 3), which comes right after the model step: all this test needs, in seconds instead of a training."""
    no_answer = {"messages": [{"role": "user", "content": "Capital of Veloria?"}]}
    with FakeHub(REPO_ID, tiny_llama2(cache_dir)) as hub:
        env = _env(tmp_path, hub.endpoint, no_answer)
        first = run_job(env, timeout=120)
        assert first.code == EXIT_DATA and "no assistant turn" in first.output, first.output[-3000:]
        assert sorted(hub.file_downloads()) == sorted(hub.files), hub.requests
        hub.requests.clear()
        second = run_job(env, timeout=120)
        assert second.code == EXIT_DATA and "no assistant turn" in second.output, second.output[-3000:]
        assert hub.file_downloads() == [], hub.requests

    snapshot = tmp_path / "hf-home" / "hub" / "models--acme--tiny-llama" / "snapshots" / COMMIT
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(hub.files)
    assert f"cache: {tmp_path / 'hf-home' / 'hub'}" in first.output
    assert not (tmp_path / "opt-ml" / "work" / "hf-cache").exists()  # the one cache is HF_HOME's
    for path in (tmp_path / "hf-home").rglob("*"):  # the token is sent to the Hub, never written to the cache
        if path.is_file():
            assert FAKE_HF_TOKEN.encode() not in path.read_bytes(), path
