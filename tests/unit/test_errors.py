"""The exit contract: one handler, a failure file SageMaker can show, documented exit codes."""

import logging

import pytest

from entrypoints import errors


def test_job_error_writes_failure_file_and_code(tmp_path, caplog):
    failure = tmp_path / "output" / "failure"

    def fail():
        raise errors.DataError("data.jsonl:3: invalid JSON (fix the line)")

    with caplog.at_level(logging.ERROR):
        code = errors.run_guarded(fail, lambda: failure)
    assert code == errors.EXIT_DATA == 3
    assert failure.read_text().startswith("data error: data.jsonl:3: invalid JSON")
    assert "data.jsonl:3" in caplog.text


def test_unexpected_error_is_internal_and_summarised(tmp_path, caplog):
    failure = tmp_path / "failure"

    def boom():
        raise RuntimeError("x" * 5000)

    with caplog.at_level(logging.ERROR):
        assert errors.run_guarded(boom, lambda: failure) == errors.EXIT_INTERNAL
    text = failure.read_text()
    assert text.startswith("internal error: RuntimeError") and len(text) <= errors.FAILURE_REASON_LIMIT
    assert caplog.records[-1].getMessage().startswith("internal error:")  # the summary comes last


def test_config_error_lists_problems(tmp_path):
    exc = errors.ConfigError(["QLORA_A=1: bad", "QLORA_B=2: worse"])
    assert "2 configuration problem(s)" in str(exc) and "  - QLORA_B=2: worse" in str(exc)


@pytest.mark.parametrize("name,code", [("EXIT_CONFIG", 2), ("EXIT_DATA", 3), ("EXIT_MODEL", 4), ("EXIT_STORAGE", 5),
                                       ("EXIT_OUTPUT_EXISTS", 6), ("EXIT_HUB_PUBLISH", 9), ("EXIT_PREEMPTED", 75),
                                       ("EXIT_INTERNAL", 1)])
def test_documented_codes_never_change(name, code):
    assert getattr(errors, name) == code


def test_unwritable_failure_file_does_not_mask_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")

    def fail():
        raise errors.ModelError("missing config.json")

    assert errors.run_guarded(fail, lambda: blocker / "output" / "failure") == errors.EXIT_MODEL


def test_a_full_disk_anywhere_down_the_chain_is_a_storage_error_with_the_path_and_free_bytes(tmp_path, caplog):
    """A full disk surfaced from a library as exit 1 with its traceback; it is exit 5 naming the file and the free
    space, whatever wraps the OSError (and in the words torch.save and safetensors use for it)."""
    import errno

    def wrapped():
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache" / "part.arrow"))
        except OSError as exc:
            raise RuntimeError("datasets could not write its cache") from exc

    failure = tmp_path / "failure"
    with caplog.at_level(logging.ERROR):
        assert errors.run_guarded(wrapped, lambda: failure) == errors.EXIT_STORAGE
    text = failure.read_text()
    assert text.startswith("storage error: the disk is full while writing " + str(tmp_path / "cache" / "part.arrow"))
    assert "bytes free on its file system" in text and "Traceback" not in caplog.text
    for words in ("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file"
                  " write failed", "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No"
                  " space left on device\" })"):
        assert errors.disk_full(RuntimeError(words)).startswith("the disk is full (")
    assert errors.disk_full(RuntimeError("something else")) is None


def test_disk_space_for_names_the_directory_of_the_step(tmp_path):
    import errno

    with pytest.raises(errors.StorageError, match=r"the disk is full while saving a checkpoint in .*ckpt \([\d,]+ bytes"):
        with errors.disk_space_for(tmp_path / "ckpt", "saving a checkpoint"):
            raise RuntimeError("No space left on device (os error 28)")
    with pytest.raises(ValueError):  # anything else passes through untouched
        with errors.disk_space_for(tmp_path, "x"):
            raise ValueError("not a disk problem")
    with pytest.raises(errors.DataError):
        with errors.disk_space_for(tmp_path, "x"):
            raise errors.DataError(f"{errno.ENOSPC}")
