"""Atomic writes: the target is the old file or the new one, never half of one, and no temp file stays."""

from __future__ import annotations

import json

import pytest

from m4oe.files import (
    MARKER,
    OutputError,
    atomic_write,
    mark_output_dir,
    replace_dir,
    write_csv,
    write_json,
    write_text,
)


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = write_text(tmp_path / "out.txt", "old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_temp_name_keeps_the_extension_writers_choose_formats_by(tmp_path):
    seen = []
    atomic_write(tmp_path / "sub" / "image.nii.gz", lambda tmp: (seen.append(tmp.name), tmp.write_bytes(b"x")))
    assert seen[0].endswith(".nii.gz") and seen[0].startswith(".image")
    assert (tmp_path / "sub" / "image.nii.gz").read_bytes() == b"x"


def test_json_and_csv_round_trip(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1.5, "y": [1, 2]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1.5, "y": [1, 2]}
    write_csv(tmp_path / "a.csv", [{"a": 1, "b": 2}, {"a": 3, "b": 4}], ["a", "b"])
    assert (tmp_path / "a.csv").read_text().splitlines() == ["a,b", "1,2", "3,4"]


def test_replace_dir_swaps_a_whole_folder(tmp_path):
    mark_output_dir(tmp_path / "target", "cache")
    (tmp_path / "target" / "stale.txt").write_text("stale")
    mark_output_dir(tmp_path / "new", "cache")
    (tmp_path / "new" / "fresh.txt").write_text("fresh")
    replace_dir(tmp_path / "new", tmp_path / "target", "cache")
    assert sorted(p.name for p in (tmp_path / "target").iterdir()) == [MARKER, "fresh.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_replace_dir_never_replaces_a_folder_that_is_not_its_own_kind(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "thesis.md").write_text("mine")
    mark_output_dir(tmp_path / "new", "cache")
    with pytest.raises(OutputError, match="holds files m4oe did not write"):
        replace_dir(tmp_path / "new", tmp_path / "target", "cache")
    mark_output_dir(tmp_path / "run", "run")
    with pytest.raises(OutputError, match="is m4oe's run folder, not a cache folder"):
        replace_dir(tmp_path / "new", tmp_path / "run", "cache")
    assert (tmp_path / "target" / "thesis.md").read_text() == "mine" and (tmp_path / "run" / MARKER).is_file()
