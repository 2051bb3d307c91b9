"""Storage against a real SeaweedFS S3 server: fetch/upload of files and prefixes, errors."""

import pytest

from entrypoints import storage
from entrypoints.errors import StorageError

pytestmark = pytest.mark.integration


def test_upload_tree_fetch_roundtrip(s3_env, tmp_path):
    server, bucket = s3_env
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.bin").write_bytes(b"\0" * 1000)
    uri = f"s3://{bucket}/run1"
    assert storage.upload_tree(src, uri, endpoint_url=server.endpoint) == ["a.txt", "sub/b.bin"]
    listed = storage.list_objects(uri, endpoint_url=server.endpoint)
    assert [(o.relative, o.size) for o in listed] == [("a.txt", 5), ("sub/b.bin", 1000)]
    got = storage.fetch(uri, tmp_path / "dst", endpoint_url=server.endpoint)
    assert (got / "a.txt").read_text() == "alpha" and (got / "sub" / "b.bin").stat().st_size == 1000
    single = storage.fetch(f"{uri}/a.txt", tmp_path / "one", endpoint_url=server.endpoint)
    assert single == tmp_path / "one" / "a.txt" and single.read_text() == "alpha"
    assert not list((tmp_path / "dst").rglob("*.partial"))


def test_read_write_text_and_missing(s3_env):
    server, bucket = s3_env
    uri = f"s3://{bucket}/x/manifest.json"
    assert storage.read_text(uri, endpoint_url=server.endpoint) is None
    storage.write_text(uri, "{}", endpoint_url=server.endpoint)
    assert storage.read_text(uri, endpoint_url=server.endpoint) == "{}"
    storage.delete(uri, endpoint_url=server.endpoint)
    assert storage.read_text(uri, endpoint_url=server.endpoint) is None


def test_missing_prefix_and_bucket_errors(s3_env, tmp_path):
    server, bucket = s3_env
    with pytest.raises(StorageError, match="nothing found at"):
        storage.fetch(f"s3://{bucket}/nope/", tmp_path, endpoint_url=server.endpoint)
    with pytest.raises(StorageError, match="does not exist|nothing found|bucket"):
        storage.fetch("s3://no-such-bucket-xyz/data.jsonl", tmp_path, endpoint_url=server.endpoint)


def test_local_paths(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("{}\n")
    assert storage.fetch(str(f), tmp_path / "unused") == f
    with pytest.raises(StorageError, match="does not exist"):
        storage.fetch(str(tmp_path / "missing"), tmp_path)
    storage.upload_file(f, str(tmp_path / "out" / "d.jsonl"))
    assert (tmp_path / "out" / "d.jsonl").read_text() == "{}\n"
