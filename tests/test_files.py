"""Atomic writes: the target holds its old content or its new one, never a part, and no
temporary is left behind."""

import errno

import pytest

from vdn_pyro.files import atomic_path, temporary_path, write_text


def test_write_text_creates_and_replaces(tmp_path):
    target = tmp_path / "table.md"
    assert write_text(target, "old\n") == target
    assert target.read_text() == "old\n"
    write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]


def test_the_temporary_keeps_the_suffix_and_is_hidden(tmp_path):
    tmp = temporary_path(tmp_path / "runs.csv")
    assert tmp.parent == tmp_path
    assert tmp.name.startswith(".runs.tmp-") and tmp.suffix == ".csv"


@pytest.mark.parametrize("error", [RuntimeError("writer failed"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_write_keeps_the_old_file(tmp_path, error):
    target = tmp_path / "runs.csv"
    target.write_text("a,b\n1,2\n")
    with pytest.raises(type(error)):
        with atomic_path(target) as tmp:
            tmp.write_text("a,b\n3,")  # half written when the error comes
            raise error
    assert target.read_text() == "a,b\n1,2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.csv"]


def test_an_os_error_names_the_target_not_the_temporary(tmp_path):
    target = tmp_path / "figure.png"
    with pytest.raises(OSError, match="No space left") as info:
        with atomic_path(target) as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert info.value.filename == str(target)
    assert info.value.errno == errno.ENOSPC
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_a_missing_directory_is_an_error_not_created(tmp_path):
    target = tmp_path / "gone" / "run.json"
    with pytest.raises(OSError) as info:
        write_text(target, "{}\n")
    assert info.value.filename == str(target)
    assert not (tmp_path / "gone").exists()


def test_write_text_refuses_bytes(tmp_path):
    with pytest.raises(TypeError, match="Expected text as a str, but got bytes"):
        write_text(tmp_path / "a.txt", b"abc")
    assert list(tmp_path.iterdir()) == []
