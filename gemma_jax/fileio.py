"""Writes that a reader never sees half done, on local disks and on gs://.

    atomic_write("runs/x/config.yaml", text)
    with atomic_directory("gs://bkt/x/hf", overwrite=True) as tmp:
      ...write files into tmp...      # replaces gs://bkt/x/hf on success
    check_remote("gs://bkt/x", "--workdir")   # seconds, not minutes

Locally a file is written to a hidden sibling and renamed over the target
(`os.replace` is atomic on POSIX). On an object store (gs://) an object only
becomes visible once its upload is complete, so writing it in place is
already atomic. An object store has no directory rename: there a directory
is written locally, then uploaded with its top-level JSON files last (every
reader of our directories starts from one: model_config.json, config.json),
so a reader sees either no directory, or a complete one.

Three clients talk to Cloud Storage, each with its own settings: gcsfs
(through etils epath: metadata, metrics, exports), tensorstore (orbax's
arrays) and array_record's C++ client (tfds ArrayRecord data). Pointed at an
emulator, all three must be (`emulator_env`); `check_remote` checks that,
the credentials and the endpoint before the first request, because each
client alone retries an unreachable endpoint for a minute or more.
"""

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
import threading
import urllib.parse

from etils import epath

from gemma_jax.errors import ConfigError, GemmaJaxError

TIMEOUT_ENV = "GEMMA_JAX_STORAGE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 10.0
_GCS = "https://storage.googleapis.com"


class StorageUnreachable(GemmaJaxError):
  """Cloud Storage (or its emulator) did not answer; exit 1: trying again
  later can succeed."""


def is_local(path) -> bool:
  return "://" not in os.fspath(path)


def absolute(path) -> str:
  """A local path made absolute (and ~ expanded); a URL as it is."""
  path = os.fspath(path)
  return os.path.abspath(os.path.expanduser(path)) if is_local(path) else path


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


def remove_tree(path) -> None:
  """Removes directory `path` and everything in it, if it exists."""
  path = epath.Path(path)
  if is_local(path):
    shutil.rmtree(path, ignore_errors=True)
  else:
    fs, key = _fs(path)
    if fs.exists(key):
      fs.rm(key, recursive=True)


_remove = remove_tree


@contextlib.contextmanager
def atomic_directory(path, overwrite: bool = False):
  """Yields a temporary directory that replaces `path` on success.

  Refuses (ConfigError) when `path` exists and not `overwrite`. Locally the
  temporary directory is a sibling; leftover siblings of an earlier, killed
  write are removed first, so one crash never blocks later writes. For a
  remote `path` it is a local directory, uploaded on success (see module
  docstring). On failure the temporary directory is removed and `path`
  keeps its old contents.
  """
  path = epath.Path(path)
  check_remote(path, "output")
  if path.exists() and not overwrite:
    raise ConfigError(f"{path} already exists; pass --force to replace it")
  if not is_local(path):
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.tmp-") as tmp:
      yield epath.Path(tmp)
      publish_directory(tmp, path)
    return
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
  if not is_local(path):
    remove_tree(path)
    move_directory(new, path)
    return
  _, old = _siblings(path)
  _remove(old)
  if path.exists():
    path.rename(old)
  epath.Path(new).rename(path)
  _remove(old)


def move_directory(src, dst) -> None:
  """Moves directory `src` to `dst` (which must not exist).

  On an object store, where nothing can be renamed, every object is copied
  (server-side) and then the source removed.
  """
  src, dst = epath.Path(src), epath.Path(dst)
  if is_local(src) and is_local(dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(os.fspath(src), os.fspath(dst))
    return
  copy_tree(src, dst)
  remove_tree(src)


def copy_tree(src, dst) -> None:
  """Copies directory `src` to `dst`, between any two file systems."""
  src, dst = epath.Path(src), epath.Path(dst)
  if is_local(src) and is_local(dst):
    shutil.copytree(src, dst)
  elif is_local(src):
    publish_directory(src, dst)
  else:
    fs, key = _fs(src)
    if is_local(dst):
      fs.get(key + "/", os.fspath(dst), recursive=True)
    else:
      fs.cp(key + "/", _fs(dst)[1], recursive=True)


def copy_file(src, dst) -> None:
  epath.Path(src).copy(epath.Path(dst), overwrite=True)


def publish_directory(local, remote) -> None:
  """Uploads local directory `local` to `remote`, replacing what is there;
  the top-level *.json files go last (see module docstring)."""
  local, remote = os.fspath(local), epath.Path(remote)
  remove_tree(remote)
  files = []
  for root, _, names in os.walk(local):
    files += [os.path.relpath(os.path.join(root, n), local) for n in names]
  last = lambda rel: os.sep not in rel and rel.endswith(".json")
  for rel in sorted(files, key=lambda rel: (last(rel), rel)):
    dest = remote / rel.replace(os.sep, "/")
    with open(os.path.join(local, rel), "rb") as f, dest.open("wb") as out:
      shutil.copyfileobj(f, out, 1 << 20)


@contextlib.contextmanager
def naming(path):
  """An OSError that names no file (the write or flush of a file opened
  earlier, a library's own writer) is raised again naming `path`, so that
  its one line says which file failed."""
  try:
    yield
  except OSError as e:
    if e.filename is not None or e.errno is None:
      raise
    raise OSError(e.errno, e.strerror or str(e), os.fspath(path)) from e


# tensorstore (orbax's arrays) reports a full disk as RESOURCE_EXHAUSTED
# while writing, with the file it was writing; XLA's out-of-memory is also
# RESOURCE_EXHAUSTED, but never while writing a file.
_FULL = re.compile(r"RESOURCE_EXHAUSTED: .*(?:[Ee]rror writing|Failed writing)")
_FILE = re.compile(r'(?:local file|Failed writing:?) "([^"]+)"')


def disk_full(error: BaseException, path=None) -> OSError | None:
  """OSError(ENOSPC) naming the file, if `error` (an OSError, or a storage
  library's error) says the disk is full; else None."""
  if isinstance(error, OSError) and error.errno == errno.ENOSPC:
    if error.filename or path is None:
      return error
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
  text = str(error)
  if not (_FULL.search(text) or "No space left on device" in text):
    return None
  found = _FILE.findall(text)
  name = found[-1] if found else (os.fspath(path) if path else None)
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)


def check_writable_directory(path, what: str) -> None:
  """Creates directory `path` if needed and proves it writable by creating
  and removing a probe file; ConfigError naming `what` and `path` if not.

  Permission bits alone do not tell (root ignores them; a read-only mount
  or a full disk does not show in them), so the probe writes for real.
  """
  path = epath.Path(path)
  probe = path / f".write-probe-{os.getpid()}"
  if not is_local(path):
    check_remote(path, what)
  try:
    if path.exists() and not path.is_dir():
      raise ConfigError(f"{what} {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    reason = e.strerror or str(e)
    raise ConfigError(
      f"{what} {path} is not writable ({reason}); fix its "
      f"permissions or free space, or choose another "
      f"--workdir"
    ) from None


# Cloud Storage: clients, emulators, the preflight.
def _configure_gcsfs() -> None:
  """gcsfs caches directory listings forever by default; tensorstore (the
  arrays of a checkpoint) and other processes write behind its back, so a
  cached listing would hide their objects (a step orbax just committed)."""
  import fsspec

  fsspec.config.conf.setdefault("gcs", {}).setdefault(
    "use_listings_cache", False
  )


_configure_gcsfs()


def _fs(path):
  """(fsspec filesystem, path without its scheme) of a remote `path`."""
  import fsspec

  return fsspec.core.url_to_fs(os.fspath(path))


def emulator_env(url: str) -> dict[str, str]:
  """The variables that point every Cloud Storage client at the emulator
  at `url` (e.g. http://127.0.0.1:9023): gcsfs, tensorstore (with a dummy
  token), array_record's C++ client; and gcsfs's zonal-bucket probe off (it
  asks a control-plane API an emulator lacks, once per call)."""
  return {
    "STORAGE_EMULATOR_HOST": url,
    "TENSORSTORE_GCS_HTTP_URL": url,
    "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }


def seconds_env(name: str, default: float, env=None) -> float:
  """A number of seconds > 0 from environment variable `name` (`default`
  when unset or empty); ConfigError naming the variable otherwise."""
  env = os.environ if env is None else env
  text = env.get(name)
  if not text:
    return default
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not value > 0:
    raise ConfigError(f"{name}={text!r}: expected a number of seconds > 0")
  return value


def storage_timeout_s(env=None) -> float:
  return seconds_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, env)


_checked: set[str] = set()


def check_remote(path, what: str, env=None) -> None:
  """Fails within seconds, in one line, if `path` (gs://) cannot be used.

  Checks that an emulator is named to every client or to none, that there
  are credentials (without an emulator), that the endpoint accepts a
  connection within GEMMA_JAX_STORAGE_TIMEOUT_S (default 10 s), and that one
  request there answers in that time. Once per bucket and process. A local
  path, or a scheme other than gs://, is not checked.
  """
  path = os.fspath(path)
  if not path.startswith("gs://"):
    return
  bucket = path[len("gs://") :].split("/")[0]
  if bucket in _checked:
    return
  env = os.environ if env is None else env
  timeout = storage_timeout_s(env)
  endpoint = _endpoint(path, what, env)
  if endpoint == _GCS:
    _check_credentials(path, what)
  _check_connect(path, what, endpoint, timeout)
  _check_request(path, what, endpoint, timeout)
  _checked.add(bucket)


def _endpoint(path: str, what: str, env) -> str:
  """The endpoint every client uses; ConfigError if they disagree."""
  names = (
    "STORAGE_EMULATOR_HOST",
    "TENSORSTORE_GCS_HTTP_URL",
    "CLOUD_STORAGE_EMULATOR_ENDPOINT",
  )
  urls = {n: env.get(n, "").rstrip("/") for n in names}
  if not any(urls.values()):
    return _GCS
  if len(set(urls.values())) > 1:
    given = ", ".join(f"{n}={v!r}" for n, v in urls.items())
    raise ConfigError(
      f"{what} {path}: the Cloud Storage emulator must be named to every "
      f"client or to none ({given}): set {', '.join(names)} to the same "
      f"URL, or unset them all"
    )
  url = urls["STORAGE_EMULATOR_HOST"]
  if "://" not in url:
    url = "http://" + url
  if "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT" not in env and env is os.environ:
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
  return url


def _check_credentials(path: str, what: str) -> None:
  import google.auth
  import google.auth.exceptions

  try:
    google.auth.default()
  except google.auth.exceptions.DefaultCredentialsError:
    raise ConfigError(
      f"{what} {path}: no Google Cloud credentials on this machine; run "
      f"`gcloud auth application-default login` or set "
      f"GOOGLE_APPLICATION_CREDENTIALS to a service-account key (a Cloud "
      f"TPU VM uses its service account)"
    ) from None


def _check_connect(path: str, what: str, endpoint: str, timeout: float):
  url = urllib.parse.urlsplit(endpoint)
  port = url.port or (443 if url.scheme == "https" else 80)
  try:
    socket.create_connection((url.hostname, port), timeout=timeout).close()
  except OSError as e:
    reason = e.strerror or str(e) or type(e).__name__
    raise StorageUnreachable(
      f"{what} {path}: cannot reach Cloud Storage at {url.hostname}:{port}"
      f" ({reason}) within {timeout:g} s; check the network"
      + (", or STORAGE_EMULATOR_HOST" if endpoint != _GCS else "")
    ) from None


def _check_request(path: str, what: str, endpoint: str, timeout: float):
  """Lists one object of the bucket through gcsfs (what a trainer needs
  anyway: storage.objects.list), on a thread, so that gcsfs's retries
  cannot hold this process past `timeout`."""
  bucket = path[len("gs://") :].split("/")[0]
  result = []

  def ask():
    try:
      fs, _ = _fs(path)
      result.append(
        fs.call("GET", "b/{}/o", bucket, maxResults=1, json_out=True)
      )
    except BaseException as e:  # reported on the caller
      result.append(e)

  thread = threading.Thread(target=ask, daemon=True, name="gcs-preflight")
  thread.start()
  thread.join(timeout)
  if not result:
    raise StorageUnreachable(
      f"{what} {path}: Cloud Storage at {endpoint} did not answer, or kept "
      f"failing, for {timeout:g} s (raise {TIMEOUT_ENV} on a slow link)"
    )
  e = result[0]
  if isinstance(e, FileNotFoundError):
    raise ConfigError(
      f"{what} {path}: there is no bucket gs://{bucket} (or "
      f"this account cannot see it); create it or fix the "
      f"path"
    ) from None
  if isinstance(e, BaseException):
    text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise StorageUnreachable(
      f"{what} {path}: Cloud Storage at {endpoint} "
      f"refused the request ({type(e).__name__}: "
      f"{text}); check this account's access to "
      f"gs://{bucket}"
    ) from None
