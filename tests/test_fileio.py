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
  with (
    pytest.raises(OSError),
    fileio.atomic_directory(target, overwrite=True) as tmp,
  ):
    raise OSError(errno.ENOSPC, "No space left on device")
  assert (target / "a").read_text() == "first"


def test_writable_probe(tmp_path, monkeypatch):
  fileio.check_writable_directory(tmp_path / "new" / "dir", "output")
  assert (tmp_path / "new" / "dir").is_dir()
  assert not list((tmp_path / "new" / "dir").iterdir())  # probe removed
  (tmp_path / "file").write_text("")
  with pytest.raises(ConfigError, match="exists and is not a directory"):
    fileio.check_writable_directory(tmp_path / "file", "output")
  cls = type(epath.Path(tmp_path))

  def read_only(self, *a, **k):
    raise OSError(errno.EROFS, "Read-only file system", str(self))

  monkeypatch.setattr(cls, "write_text", read_only)
  with pytest.raises(
    ConfigError,
    match="output .* is not writable "
    r"\(Read-only file system\)",
  ):
    fileio.check_writable_directory(tmp_path, "output")


# gs:// (against the emulator of tests/conftest.py).
def test_a_remote_directory_is_replaced_whole_and_a_failed_write_keeps_it(
  gcs_bucket,
):
  target = epath.Path(f"{gcs_bucket}/run/hf")
  with fileio.atomic_directory(target) as tmp:
    assert fileio.is_local(tmp)  # written locally, then uploaded
    (tmp / "config.json").write_text("{}")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "w.bin").write_bytes(b"first")
  with (
    pytest.raises(ConfigError, match="already exists"),
    fileio.atomic_directory(target),
  ):
    pass
  with (
    pytest.raises(OSError),
    fileio.atomic_directory(target, overwrite=True) as tmp,
  ):
    (tmp / "config.json").write_text("{}")
    raise OSError(errno.ENOSPC, "No space left on device")
  assert (target / "sub" / "w.bin").read_bytes() == b"first"
  with fileio.atomic_directory(target, overwrite=True) as tmp:
    (tmp / "other").write_text("second")
  assert sorted(p.name for p in target.iterdir()) == ["other"]


def test_directories_move_and_copy_between_disk_and_gs(gcs_bucket, tmp_path):
  local = tmp_path / "a"
  (local / "x").mkdir(parents=True)
  (local / "x" / "f").write_text("data")
  (local / "meta.json").write_text("{}")
  remote = epath.Path(f"{gcs_bucket}/a")
  fileio.copy_tree(local, remote)
  fileio.move_directory(remote, f"{gcs_bucket}/moved/a")  # no rename there
  assert not remote.exists()
  back = tmp_path / "back"
  fileio.copy_tree(f"{gcs_bucket}/moved/a", back)
  assert (back / "x" / "f").read_text() == "data"
  assert (back / "meta.json").read_text() == "{}"
  fileio.remove_tree(f"{gcs_bucket}/moved")
  assert not epath.Path(f"{gcs_bucket}/moved").exists()


def test_a_listing_sees_objects_written_behind_its_back(gcs_bucket):
  """Tensorstore (orbax's arrays) and other processes write without gcsfs
  knowing: its listing cache is off, or a committed step would stay
  invisible."""
  import fsspec

  fs = fsspec.filesystem("gcs")
  other = fsspec.filesystem("gcs", skip_instance_cache=True)
  fs.pipe(f"{gcs_bucket}/d/a", b"1")
  assert len(fs.ls(f"{gcs_bucket}/d")) == 1
  other.pipe(f"{gcs_bucket}/d/b", b"2")
  assert len(fs.ls(f"{gcs_bucket}/d")) == 2


def test_an_unreachable_endpoint_fails_in_seconds_in_one_line(monkeypatch):
  import socket
  import time

  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  for key, value in fileio.emulator_env(f"http://127.0.0.1:{port}").items():
    monkeypatch.setenv(key, value)
  start = time.monotonic()
  with pytest.raises(
    fileio.StorageUnreachable,
    match=rf"--workdir gs://nowhere/run: cannot reach Cloud "
    rf"Storage at 127.0.0.1:{port} \(Connection refused\)",
  ):
    fileio.check_remote("gs://nowhere/run", "--workdir")
  assert time.monotonic() - start < 5


def test_an_emulator_named_to_some_clients_only_is_refused(monkeypatch):
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:1")
  monkeypatch.delenv("TENSORSTORE_GCS_HTTP_URL", raising=False)
  with pytest.raises(ConfigError, match="TENSORSTORE_GCS_HTTP_URL=''"):
    fileio.check_remote("gs://b/run", "--workdir")


def test_no_credentials_is_a_one_line_config_error(monkeypatch, tmp_path):
  for key in fileio.emulator_env("x"):
    monkeypatch.delenv(key, raising=False)
  monkeypatch.setenv(
    "GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json")
  )
  with pytest.raises(
    ConfigError,
    match="gs://b/run: no Google Cloud "
    "credentials on this machine; run `gcloud auth",
  ):
    fileio.check_remote("gs://b/run", "--workdir")


def test_the_storage_timeout_comes_from_the_environment():
  assert fileio.storage_timeout_s({}) == 10
  assert fileio.storage_timeout_s({"GEMMA_JAX_STORAGE_TIMEOUT_S": "2.5"}) == 2.5
  with pytest.raises(ConfigError, match="GEMMA_JAX_STORAGE_TIMEOUT_S='-1'"):
    fileio.storage_timeout_s({"GEMMA_JAX_STORAGE_TIMEOUT_S": "-1"})


def test_a_full_disk_is_told_as_one_whatever_reports_it():
  # tensorstore (orbax's arrays) says RESOURCE_EXHAUSTED while writing
  ts = ValueError(
    'RESOURCE_EXHAUSTED: Error writing "w/0.0" in OCDBT database at local '
    'file "/run/ckpt/4.tmp/ocdbt.process_0/": Failed writing: '
    '"/run/ckpt/4.tmp/ocdbt.process_0/d/ab12"'
  )
  full = fileio.disk_full(ts)
  assert full.errno == errno.ENOSPC
  assert full.filename == "/run/ckpt/4.tmp/ocdbt.process_0/d/ab12"
  # an OSError without a file gets the path it was writing
  bare = fileio.disk_full(OSError(errno.ENOSPC, "No space"), "/run/x")
  assert bare.filename == "/run/x"
  # XLA's out-of-memory is RESOURCE_EXHAUSTED too, but no full disk
  oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 3GiB")
  assert fileio.disk_full(oom) is None
  assert fileio.disk_full(OSError(errno.EACCES, "denied")) is None


def test_cli_tells_a_full_disk_in_one_line_with_the_fix():
  from gemma_jax import cli

  line = cli.one_line(
    ValueError('RESOURCE_EXHAUSTED: Error writing local file "/d/f": x')
  )
  assert line == (
    "/d/f: No space left on device (free some space and rerun; completed "
    "checkpoints and exports are kept whole)"
  )
