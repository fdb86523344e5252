"""`trl_rpo.files`: every file the package writes is replaced whole or not at all."""

import json

import pytest

from trl_rpo.files import atomic_path, write_json


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "rounds.json"
    write_json(path, {"round": 1})

    def crash_halfway():
        with atomic_path(path) as tmp:
            tmp.write_text('{"round": 2, "half')  # a crash halfway through the new content
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        crash_halfway()
    assert json.loads(path.read_text()) == {"round": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["rounds.json"]


def test_a_finished_write_replaces_the_file(tmp_path):
    path = tmp_path / "scoring_config.json"
    write_json(path, {"rows": 1})
    write_json(path, {"rows": 2})
    assert json.loads(path.read_text()) == {"rows": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["scoring_config.json"]
