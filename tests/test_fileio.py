"""fileio: writes that survive a crash, and the writable-directory probe."""

import errno

import pytest
from etils import epath

from gemma_jax import fileio
from gemma_jax.errors import ConfigError


def test_leftovers_of_a_killed_write_do_not_block_the_next(tmp_path):
  target = tmp_path / "params"
  with fileio.atomic_directory(target) as tmp:
    (tmp / "a").write_text("first")
  # A write killed after renaming the old directory aside, and another
  # killed mid-write: both leave hidden siblings behind.
  (tmp_path / ".params.old").mkdir()
  (tmp_path / ".params.old" / "a").write_text("older")
  (tmp_path / ".params.tmp").mkdir()
  (tmp_path / ".params.tmp" / "junk").write_text("x")
  with fileio.atomic_directory(target, overwrite=True) as tmp:
    (tmp / "a").write_text("second")
  assert (target / "a").read_text() == "second"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["params"]


def test_a_failed_write_keeps_the_old_directory(tmp_path):
  target = tmp_path / "params"
  with fileio.atomic_directory(target) as tmp:
    (tmp / "a").write_text("first")
  with pytest.raises(OSError):
    with fileio.atomic_directory(target, overwrite=True) as tmp:
      raise OSError(errno.ENOSPC, "No space left on device")
  assert (target / "a").read_text() == "first"


def test_writable_probe(tmp_path, monkeypatch):
  fileio.check_writable_directory(tmp_path / "new" / "dir", "output")
  assert (tmp_path / "new" / "dir").is_dir()
  assert not list((tmp_path / "new" / "dir").iterdir())   # probe removed
  (tmp_path / "file").write_text("")
  with pytest.raises(ConfigError, match="exists and is not a directory"):
    fileio.check_writable_directory(tmp_path / "file", "output")
  cls = type(epath.Path(tmp_path))
  def read_only(self, *a, **k):
    raise OSError(errno.EROFS, "Read-only file system", str(self))
  monkeypatch.setattr(cls, "write_text", read_only)
  with pytest.raises(ConfigError, match="output .* is not writable "
                     r"\(Read-only file system\)"):
    fileio.check_writable_directory(tmp_path, "output")
