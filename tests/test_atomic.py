"""One way to write a file or a folder (qlora_kit/atomic.py): complete or absent, never half there."""

import os

import pytest

from qlora_kit import atomic


def test_file_replaces_in_one_step_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.jsonl"
    target.write_text("old\n")
    atomic.write_text(target, "new\n")
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["metrics.jsonl"]
    atomic.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_file_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "adapter_config.json"
    target.write_text("good")
    with pytest.raises(RuntimeError), atomic.atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "good" and os.listdir(tmp_path) == ["adapter_config.json"]


def test_folder_is_complete_or_absent(tmp_path):
    out = tmp_path / "export"
    with pytest.raises(RuntimeError), atomic.atomic_folder(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []  # no `out`, no temporary
    with atomic.atomic_folder(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("a")
    assert (out / "sub" / "a.txt").read_text() == "a" and os.listdir(tmp_path) == ["export"]


def test_folder_replaces_only_when_asked(tmp_path):
    out = tmp_path / "step-4"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError), atomic.atomic_folder(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert os.listdir(out) == ["old.txt"] and os.listdir(tmp_path) == ["step-4"]
    with pytest.raises(RuntimeError), atomic.atomic_folder(out, replace=True) as tmp:
        raise RuntimeError("failed before the rename")
    assert os.listdir(out) == ["old.txt"]  # a failed replacement leaves the old folder intact
    with atomic.atomic_folder(out, replace=True, tmp=tmp_path / ".tmp-step-4-1") as tmp:
        assert tmp.name == ".tmp-step-4-1"
        (tmp / "new.txt").write_text("new")
    assert os.listdir(out) == ["new.txt"] and os.listdir(tmp_path) == ["step-4"]
