"""Writes that a reader never sees half done, on local disks and on gs://.

    atomic_write("runs/x/config.yaml", text)
    with atomic_directory("runs/x/params", overwrite=True) as tmp:
      ...write files into tmp...      # replaces runs/x/params on success

Locally a file is written to a hidden sibling and renamed over the target
(`os.replace` is atomic on POSIX). On an object store (gs://) an object only
becomes visible once its upload is complete, so writing it in place is
already atomic; a directory there is written in place, then marked complete.
"""

import contextlib
import os
import shutil

from etils import epath

from gemma_jax.errors import ConfigError


def is_local(path) -> bool:
  return "://" not in os.fspath(path)


def atomic_write(path, data: bytes | str) -> None:
  """Writes `data` to `path` whole or not at all."""
  path = epath.Path(path)
  mode = "w" if isinstance(data, str) else "wb"
  if not is_local(path):
    with path.open(mode) as f:
      f.write(data)
    return
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with open(tmp, mode) as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def _siblings(path: epath.Path) -> tuple[epath.Path, epath.Path]:
  return (path.parent / f".{path.name}.tmp", path.parent / f".{path.name}.old")


def _remove(path: epath.Path) -> None:
  if is_local(path):
    shutil.rmtree(path, ignore_errors=True)
  elif path.exists():
    path.rmtree()


@contextlib.contextmanager
def atomic_directory(path, overwrite: bool = False):
  """Yields a temporary sibling directory that replaces `path` on success.

  Refuses (ConfigError) when `path` exists and not `overwrite`. Leftover
  siblings of an earlier, killed write are removed first, so one crash never
  blocks later writes. On failure the temporary directory is removed and
  `path` keeps its old contents.
  """
  path = epath.Path(path)
  if path.exists() and not overwrite:
    raise ConfigError(f"{path} already exists; pass --force to replace it")
  tmp = fresh_temporary_sibling(path)
  try:
    yield tmp
  except BaseException:
    _remove(tmp)
    raise
  replace_directory(tmp, path)


def temporary_sibling(path) -> epath.Path:
  """The hidden sibling of `path` that `atomic_directory` writes into."""
  return _siblings(epath.Path(path))[0]


def fresh_temporary_sibling(path) -> epath.Path:
  """`temporary_sibling(path)`, emptied of any leftover of a killed write."""
  tmp = temporary_sibling(path)
  _remove(tmp)
  tmp.mkdir(parents=True)
  return tmp


def replace_directory(new: epath.Path, path: epath.Path) -> None:
  """Moves directory `new` to `path`, replacing what is there.

  Locally the old directory is first renamed aside, so `path` is at every
  moment either the old or the new directory (or, for an instant, absent).
  """
  path = epath.Path(path)
  _, old = _siblings(path)
  _remove(old)
  if path.exists():
    path.rename(old)
  epath.Path(new).rename(path)
  _remove(old)


def check_writable_directory(path, what: str) -> None:
  """Creates directory `path` if needed and proves it writable by creating
  and removing a probe file; ConfigError naming `what` and `path` if not.

  Permission bits alone do not tell (root ignores them; a read-only mount
  or a full disk does not show in them), so the probe writes for real.
  """
  path = epath.Path(path)
  probe = path / f".write-probe-{os.getpid()}"
  try:
    if path.exists() and not path.is_dir():
      raise ConfigError(f"{what} {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    reason = e.strerror or str(e)
    raise ConfigError(f"{what} {path} is not writable ({reason}); fix its "
                      f"permissions or free space, or choose another "
                      f"--workdir") from None
