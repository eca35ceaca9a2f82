"""Atomic writes end with the mode a plain open()/mkdir() would give under the process umask."""

from __future__ import annotations

import os
import stat

import pytest

from lmlab.utils.atomic import atomic_dir, current_umask, write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_current_umask_reads_without_changing(umask):
    assert current_umask() == umask
    assert current_umask() == umask


def test_files_and_dirs_get_plain_modes(tmp_path, umask):
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain_dir").mkdir()
    write_text(tmp_path / "atomic.txt", "x")
    with atomic_dir(tmp_path / "atomic_dir") as d:
        (d / "inner.txt").write_text("x")
    assert _mode(tmp_path / "atomic.txt") == _mode(tmp_path / "plain.txt")
    assert _mode(tmp_path / "atomic_dir") == _mode(tmp_path / "plain_dir")


def test_checkpoint_modes_follow_umask(tmp_path, umask):
    """A trainer checkpoint (weights, config, tokenizer, state) reads like files a plain write makes."""
    from lmlab.model.checkpoint import save_pretrained
    from lmlab.train.checkpoint import write_checkpoint
    from tests.train.helpers import tiny_model

    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain_dir").mkdir()
    file_mode, dir_mode = _mode(tmp_path / "plain.txt"), _mode(tmp_path / "plain_dir")
    model = tiny_model()
    params = {k: v.detach() for k, v in model.state_dict().items()}
    ckpt = write_checkpoint(tmp_path / "run" / "step-000001", model.cfg, params, None, {"step": 1}, {"a": 1})
    merged = save_pretrained(model, None, tmp_path / "merged")
    for folder in (ckpt, merged):
        assert _mode(folder) == dir_mode, folder
        files = list(folder.iterdir())
        assert any(f.name == "model.safetensors" for f in files)
        for f in files:
            assert _mode(f) == file_mode, f
