"""`llava_jp.files`: the one atomic write. A failed write leaves the previous file or folder
untouched and no `.tmp` behind; a folder replaces a folder."""

import json

import pytest

from llava_jp.files import replace_atomically, write_json


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_tmp(tmp_path):
    path = tmp_path / "sub" / "state.json"
    write_json(path, {"step": 1, "note": "日本語"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"step": 1, "note": "日本語"}

    def half_then_fail(tmp):
        tmp.write_text('{"step": 2', encoding="utf-8")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        replace_atomically(path, half_then_fail)
    assert json.loads(path.read_text(encoding="utf-8"))["step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]


def test_a_folder_replaces_a_folder_whole(tmp_path):
    final = tmp_path / "model"

    def folder(files):
        def write(tmp):
            tmp.mkdir()
            for name in files:
                (tmp / name).write_text(name)
        return write

    replace_atomically(final, folder(["a", "b"]))
    replace_atomically(final, folder(["c"]))
    assert sorted(p.name for p in final.iterdir()) == ["c"]
    with pytest.raises(KeyboardInterrupt):  # an interrupted write too leaves the folder as it was
        replace_atomically(final, lambda tmp: (tmp.mkdir(), (_ for _ in ()).throw(KeyboardInterrupt())))
    assert sorted(p.name for p in final.iterdir()) == ["c"] and not (tmp_path / "model.tmp").exists()
