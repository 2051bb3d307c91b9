"""Storage against a real SeaweedFS S3 server: fetch/upload of files and prefixes, errors."""

import pytest

from entrypoints import storage
from entrypoints.errors import StorageError


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


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_fetch_mirrors_the_listing_exactly(s3_env, tmp_path, caplog):
    """A rerun with another prefix into the same directory: only the new prefix's files remain, leftovers of an
    interrupted download included."""
    server, bucket = s3_env
    client = server.client()
    client.put_object(Bucket=bucket, Key="old/a.jsonl", Body=b"old a\n")
    client.put_object(Bucket=bucket, Key="old/sub/b.jsonl", Body=b"old b\n")
    client.put_object(Bucket=bucket, Key="new/c.jsonl", Body=b"new c\n")
    client.put_object(Bucket=bucket, Key="new/sub/b.jsonl", Body=b"new b\n")  # same name and size, other bytes
    dest = tmp_path / "data" / "train"
    storage.fetch(f"s3://{bucket}/old/", dest, endpoint_url=server.endpoint)
    assert _files(dest) == {"a.jsonl": b"old a\n", "sub/b.jsonl": b"old b\n"}
    (dest / "c.jsonl.partial").write_bytes(b"half")  # an interrupted download
    (dest / "junk" / "x.json").parent.mkdir()
    (dest / "junk" / "x.json").write_text("{}")
    with caplog.at_level("INFO", logger="qlora.storage"):
        got = storage.fetch(f"s3://{bucket}/new/", dest, endpoint_url=server.endpoint)
    assert got == dest
    assert _files(dest) == {"c.jsonl": b"new c\n", "sub/b.jsonl": b"new b\n"}
    assert not (dest / "junk").exists()
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith(f"downloading s3://{bucket}/new/"))
    assert f"to {dest}: 2 file(s)" in line and "reusing 0" in line
    assert "removed 3 not in the listing: junk/x.json, c.jsonl.partial, a.jsonl" in line, line
    assert "1 changed or unverified, replaced: sub/b.jsonl" in line, line


def test_fetch_downloads_a_changed_object_of_the_same_size_again(s3_env, tmp_path, caplog):
    server, bucket = s3_env
    client = server.client()
    client.put_object(Bucket=bucket, Key="d/train.jsonl", Body=b'{"v": 1}\n')
    uri = f"s3://{bucket}/d/train.jsonl"
    first = storage.fetch(uri, tmp_path / "train", endpoint_url=server.endpoint)
    assert first.read_bytes() == b'{"v": 1}\n'
    mtime = first.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="qlora.storage"):
        assert storage.fetch(uri, tmp_path / "train", endpoint_url=server.endpoint) == first
    assert first.stat().st_mtime_ns == mtime and "reusing 1 unchanged" in caplog.text  # unchanged: not fetched again
    client.put_object(Bucket=bucket, Key="d/train.jsonl", Body=b'{"v": 2}\n')  # same name, same size
    again = storage.fetch(uri, tmp_path / "train", endpoint_url=server.endpoint)
    assert again.read_bytes() == b'{"v": 2}\n'
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["train.jsonl"]


def test_conditional_writes(s3_env, tmp_path):
    """put_if / delete_if on S3 (If-None-Match, If-Match) and on a local directory (link, lock) behave alike."""
    server, bucket = s3_env
    for uri in (f"s3://{bucket}/cond/x.json", str(tmp_path / "cond" / "x.json")):
        first = storage.put_if(uri, "one", etag=None, endpoint_url=server.endpoint)
        with pytest.raises(storage.Conflict):
            storage.put_if(uri, "two", etag=None, endpoint_url=server.endpoint)
        second = storage.put_if(uri, "two", etag=first, endpoint_url=server.endpoint)
        with pytest.raises(storage.Conflict):
            storage.put_if(uri, "three", etag=first, endpoint_url=server.endpoint)
        assert storage.read_versioned(uri, endpoint_url=server.endpoint) == storage.Versioned("two", second)
        with pytest.raises(storage.Conflict):
            storage.delete_if(uri, first, endpoint_url=server.endpoint)
        storage.delete_if(uri, second, endpoint_url=server.endpoint)
        assert storage.read_text(uri, endpoint_url=server.endpoint) is None
    assert sorted(p.name for p in (tmp_path / "cond").iterdir()) == [storage.LOCK_NAME]
