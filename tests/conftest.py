"""Shared fixtures: a real SeaweedFS S3 server, tiny real models, the real tokenizers.

Tiers by folder: tests/unit (no servers, seconds), tests/integration (real servers, tiny real models, the job as a
subprocess), tests/gpu (skipped without CUDA). `slow` (the image build, random repeated kills) is marked per test
and left out of the default run.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from entrypoints.demo.local_s3 import S3Server

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = Path(str(item.fspath)).relative_to(REPO / "tests").parts[0]
        item.add_marker({"unit": pytest.mark.unit, "integration": pytest.mark.integration,
                         "gpu": pytest.mark.gpu}[tier])
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA (run on a GPU machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _root_logging_as_it_was():
    """A command's main() run in-process configures the root logger (logging.basicConfig) with the stream pytest
    captured for that test, closed afterwards: later tests' log lines would go to it ("--- Logging error ---") and a
    later main()'s basicConfig would find handlers and do nothing. Each test gets the root logger back as it was."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("weed")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point boto3 in this process at the test server; returns (server, fresh bucket name)."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket)
    return s3_server, bucket


@pytest.fixture(scope="module")
def moto_url():
    """moto's AWS server over real HTTP on loopback (SageMaker, Scheduler, Secrets Manager)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    d = Path(os.environ.get("QLORA_TEST_CACHE", REPO / ".cache"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def tiny_model(cache_dir) -> Path:
    """The ~20 MB Llama-2-shaped model with random weights and the real Llama 2 tokenizer (built once, cached)."""
    from entrypoints.demo.assets import tiny_llama2

    return tiny_llama2(cache_dir)


@pytest.fixture(scope="session")
def tiny_model_nf4(tiny_model, tmp_path_factory) -> Path:
    """The tiny model as a pre-quantized checkpoint, made the way the published `*-bnb-4bit` repositories are: loaded
    with transformers' BitsAndBytesConfig (nf4, double quantization) on the CPU and saved with save_pretrained, in
    three shards (so the index and a shard at a time are exercised), with the tokenizer beside it."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    target = tmp_path_factory.mktemp("tiny-nf4") / "model"
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": "cpu"})
    model.save_pretrained(target, max_shard_size="4MB")
    for item in tiny_model.iterdir():
        if item.name.startswith("tokenizer"):
            shutil.copy(item, target / item.name)
    assert len(list(target.glob("*.safetensors"))) >= 2
    return target


@pytest.fixture
def restore_signals():
    """For tests that run the job's main() in this process: it installs SIGTERM/SIGINT handlers (preemption)."""
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
