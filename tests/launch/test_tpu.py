"""`gemma-jax launch` on Cloud TPU VMs: the exact gcloud command lines, and
the checks that come before any of them.

Expected syntax from the gcloud reference pages
(https://cloud.google.com/sdk/gcloud/reference/compute/tpus/...):
queued-resources/create
(`QUEUED_RESOURCE --zone --runtime-version --accelerator-type
(--node-id | --node-count --node-prefix) [--spot] [--reserved]`; the page's
example: `create my-queued-resource --accelerator-type=v4-8
--runtime-version=v2-alpha-tpuv4 --node-id=my-node-001 --zone=us-central2-b
--project=my-project`), .../queued-resources/delete (`--force`),
.../tpu-vm/scp and .../tpu-vm/ssh (`--worker`, `--command`).
"""

import os
import pathlib
import shlex
import stat

import pytest

from gemma_jax import cli
from gemma_jax.launch import tpu as tpu_lib

ROOT = pathlib.Path(__file__).parents[2]
PODS = "configs/pods"
QR = "gcloud compute tpus queued-resources"


def launch(capsys, *args):
  code = cli.main(["launch", *args])
  out, err = capsys.readouterr()
  return code, out.splitlines(), err


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
  monkeypatch.chdir(ROOT)  # configs/ paths as in the docs


@pytest.mark.parametrize(
  "config, tpu, zone, extra, expected",
  [
    # v5e: chips; Gemma 1 7B on one v5e pod, spot.
    (
      f"{PODS}/gemma-7b-v5e.yaml",
      "v5e:16x16",
      "us-west4-a",
      ["--spot"],
      f"{QR} create g7b --node-id=g7b --accelerator-type=v5litepod-256 "
      f"--runtime-version=v2-alpha-tpuv5-lite --zone=us-west4-a --spot",
    ),
    # v4: 4096 chips as 8x16x32. No accelerator type names that shape
    # (v4-8192 counts TensorCores, not the shape): --type and --topology.
    (
      f"{PODS}/gemma2-9b-v4.yaml",
      "v4:8x16x32",
      "us-central2-b",
      ["--reserved"],
      f"{QR} create g7b --node-id=g7b --type=v4 --topology=8x16x32 "
      f"--runtime-version=tpu-ubuntu2204-base --zone=us-central2-b "
      f"--reserved",
    ),
    # v5p: 6144 chips as 8x24x32, the Gemma 2 paper's slice; v5p-12288 is
    # 16x16x24 (cloud.google.com/tpu/docs/v5p).
    (
      f"{PODS}/gemma2-27b-v5p.yaml",
      "v5p:8x24x32",
      "us-east5-a",
      [],
      f"{QR} create g7b --node-id=g7b --type=v5p --topology=8x24x32 "
      f"--runtime-version=v2-alpha-tpuv5 --zone=us-east5-a",
    ),
    # ... while 16x16x24 is what v5p-12288 names.
    (
      f"{PODS}/gemma2-27b-v5p.yaml",
      "v5p:16x16x24",
      "us-east5-a",
      [],
      f"{QR} create g7b --node-id=g7b --accelerator-type=v5p-12288 "
      f"--runtime-version=v2-alpha-tpuv5 --zone=us-east5-a",
    ),
    # Multislice: 2 x v5e-256, nodes g7b-0 and g7b-1.
    (
      f"{PODS}/gemma2-2b-v5e-2slices.yaml",
      "v5e:16x16",
      "us-west4-a",
      ["--slices", "2", "--project", "proj"],
      f"{QR} create g7b --node-count=2 --node-prefix=g7b "
      f"--accelerator-type=v5litepod-256 "
      f"--runtime-version=v2-alpha-tpuv5-lite --zone=us-west4-a "
      f"--project=proj",
    ),
  ],
)
def test_create_renders_the_documented_command(
  capsys, config, tpu, zone, extra, expected
):
  code, out, err = launch(
    capsys,
    "create",
    config,
    "--name",
    "g7b",
    "--zone",
    zone,
    "--tpu",
    tpu,
    *extra,
    "--dry-run",
  )
  assert code == 0, err
  assert out == [expected]


def test_a_smaller_v5p_slice_from_the_mesh(capsys):
  # 27B's mesh with 128 chips: --tpu v5p alone picks the 4x4x8 cube pair.
  code, out, err = launch(
    capsys,
    "create",
    f"{PODS}/gemma2-27b-v5p.yaml",
    "--set",
    "mesh.ici_fsdp=16",
    "--name",
    "p",
    "--zone",
    "us-east5-a",
    "--tpu",
    "v5p",
    "--dry-run",
  )
  assert code == 0, err
  assert out == [
    f"{QR} create p --node-id=p --accelerator-type=v5p-256 "
    f"--runtime-version=v2-alpha-tpuv5 --zone=us-east5-a"
  ]


def test_run_ships_the_checkout_and_starts_every_slice(capsys, tmp_path):
  code, out, err = launch(
    capsys,
    "run",
    f"{PODS}/gemma2-2b-v5e-2slices.yaml",
    "--name",
    "g2",
    "--zone",
    "us-west4-a",
    "--tpu",
    "v5e:16x16",
    "--slices",
    "2",
    "--workdir",
    "gs://b/r",
    "--set",
    "train.steps=10",
    "--log-dir",
    str(tmp_path),
    "--dry-run",
  )
  assert code == 0, err
  archive = f"{tmp_path}/code.tar.gz"
  config = f"{ROOT}/{PODS}/gemma2-2b-v5e-2slices.yaml"

  def start(i):
    return (
      "set -e; mkdir -p ~/gemma_jax ~/gemma_jax_run; find ~/gemma_jax "
      "-mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +; "
      "tar xzf ~/gemma_jax.tar.gz -C ~/gemma_jax; cd ~/gemma_jax; "
      "JAX_PLATFORMS=tpu GEMMA_JAX_DISTRIBUTED=1 GEMMA_JAX_EXTRAS=tpu "
      f"nohup bash launch/tpu_worker.sh {i} "
      ".launch/gemma2-2b-v5e-2slices.yaml --workdir gs://b/r --set "
      "train.steps=10 > /dev/null 2>&1 < /dev/null &"
    )

  assert [shlex.split(line) for line in out[:6]] == [
    ["git", "-C", str(ROOT), "stash", "create"],
    [
      "git",
      "-C",
      str(ROOT),
      "archive",
      "--format=tar.gz",
      "-o",
      archive,
      "--prefix=.launch/",
      f"--add-file={config}",
      "--prefix=",
      "HEAD",
    ],
    [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "scp",
      archive,
      "g2-0:gemma_jax.tar.gz",
      "--worker=all",
      "--zone=us-west4-a",
    ],
    [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "scp",
      archive,
      "g2-1:gemma_jax.tar.gz",
      "--worker=all",
      "--zone=us-west4-a",
    ],
    [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "ssh",
      "g2-0",
      "--worker=all",
      "--zone=us-west4-a",
      "--command=" + start(0),
    ],
    [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "ssh",
      "g2-1",
      "--worker=all",
      "--zone=us-west4-a",
      "--command=" + start(1),
    ],
  ]


def test_status_stop_delete_logs(capsys):
  where = ["--name", "g2", "--zone", "z", "--slices", "2", "--dry-run"]
  assert launch(capsys, "status", *where)[1] == [
    f"{QR} describe g2 --zone=z '--format=value(state.state)'",
    "gcloud compute tpus tpu-vm ssh g2-0 --worker=0 --zone=z "
    + shlex.quote("--command=" + tpu_lib.REMOTE_EXIT),
  ]
  assert launch(capsys, "delete", *where)[1] == [
    f"{QR} delete g2 --zone=z --force --quiet"
  ]
  stop = shlex.quote(
    "--command=test -f ~/gemma_jax_run/worker.pid && kill "
    "-TERM $(cat ~/gemma_jax_run/worker.pid) || true"
  )
  assert launch(capsys, "stop", *where)[1] == [
    f"gcloud compute tpus tpu-vm ssh g2-{i} --worker=all --zone=z {stop}"
    for i in range(2)
  ]
  assert launch(
    capsys, "logs", *where, "--follow", "--slice", "1", "--worker", "3"
  )[1] == [
    "gcloud compute tpus tpu-vm ssh g2-1 --worker=3 --zone=z "
    "'--command=tail -n 100 -F ~/gemma_jax_run/train.log'"
  ]


@pytest.mark.parametrize(
  "config, args, message",
  [
    # 7B's 16 x 16 mesh on a 128-chip slice.
    (
      f"{PODS}/gemma-7b-v5e.yaml",
      ["--tpu", "v5e:8x16"],
      "does not fit 1 x v5litepod-128 (v5e:8x16, 128 chips per slice): mesh: "
      "ici_data=1, ici_fsdp=16, ici_tensor=16 (product 256) does not divide "
      "the 128 devices per slice",
    ),
    # A one-slice mesh asked for two slices.
    (
      f"{PODS}/gemma-7b-v5e.yaml",
      ["--tpu", "v5e:16x16", "--slices", "2"],
      "does not fit 2 x v5litepod-256 (v5e:16x16, 256 chips per slice): mesh: "
      "dcn_data=1, dcn_fsdp=1, dcn_tensor=1 (product 1) must equal the 2 "
      "slices",
    ),
    (
      f"{PODS}/gemma-7b-v5e.yaml",
      ["--tpu", "v5e:32x32"],
      "--tpu 'v5e:32x32': v5e slices are one of",
    ),
    ("nope.yaml", ["--tpu", "v5e:16x16"], "nope.yaml"),
  ],
)
def test_a_config_that_does_not_fit_is_refused_before_gcloud(
  capsys, monkeypatch, tmp_path, config, args, message
):
  calls = _fake_gcloud(monkeypatch, tmp_path, account="me@example.com")
  code, out, err = launch(
    capsys, "create", config, "--name", "x", "--zone", "z", *args
  )
  assert code == 2 and message in err and out == []
  assert not calls.exists()  # gcloud was never called


def test_a_local_workdir_is_refused(capsys):
  code, _, err = launch(
    capsys,
    "run",
    f"{PODS}/gemma-7b-v5e.yaml",
    "--name",
    "x",
    "--zone",
    "z",
    "--tpu",
    "v5e:16x16",
    "--workdir",
    "/tmp/run",
    "--dry-run",
  )
  assert code == 2 and "use a gs:// path" in err


def _fake_gcloud(monkeypatch, tmp_path, account: str):
  """A `gcloud` on PATH that logs its arguments and knows one account."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "calls"
  script = bin_dir / "gcloud"
  script.write_text(
    "#!/bin/sh\n"
    f'echo "$*" >> {calls}\n'
    f"if [ \"$1\" = auth ]; then echo '{account}'; fi\n"
  )
  script.chmod(script.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  return calls


# One `launch create` of a real pod config, for the gcloud preflight tests.
CREATE_7B = (
  "create",
  f"{PODS}/gemma-7b-v5e.yaml",
  *("--name", "x", "--zone", "z", "--tpu", "v5e:16x16"),
)


def test_no_gcloud_on_path_is_one_error_before_anything(
  capsys, monkeypatch, tmp_path
):
  monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
  code, out, err = launch(capsys, *CREATE_7B)
  assert code == 1 and out == []
  assert err == (
    "gemma-jax launch: error: gcloud is not on PATH: install the "
    "Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
    ", then `gcloud auth login`\n"
  )


def test_not_logged_in_is_one_error_before_anything(
  capsys, monkeypatch, tmp_path
):
  calls = _fake_gcloud(monkeypatch, tmp_path, account="")
  code, out, err = launch(capsys, *CREATE_7B)
  assert code == 1 and out == []
  assert "gcloud has no active account: run `gcloud auth login`" in err
  assert calls.read_text().splitlines() == [
    "auth list --filter=status:ACTIVE --format=value(account)"
  ]


def test_logged_in_create_runs_gcloud(capsys, monkeypatch, tmp_path):
  calls = _fake_gcloud(monkeypatch, tmp_path, account="me@example.com")
  code, _, err = launch(capsys, *CREATE_7B)
  assert code == 0, err
  assert calls.read_text().splitlines() == [
    "auth list --filter=status:ACTIVE --format=value(account)",
    "compute tpus queued-resources create x --node-id=x "
    "--accelerator-type=v5litepod-256 --runtime-version=v2-alpha-tpuv5-lite "
    "--zone=z",
  ]


@pytest.mark.parametrize("action", ["create", "watch", "run"])
def test_a_dry_run_checks_the_zone_of_the_generation(capsys, tmp_path, action):
  # v5p is offered in us-east5-a, not us-west4-a (cloud.google.com/tpu/docs/
  # regions-zones); without --dry-run gcloud is the judge.
  extra = [] if action == "create" else ["--workdir", "gs://b/r"]
  code, out, err = launch(
    capsys,
    action,
    f"{PODS}/gemma2-27b-v5p.yaml",
    *("--name", "p", "--zone", "us-west4-a", "--tpu", "v5p:8x24x32"),
    *extra,
    *("--log-dir", str(tmp_path / "logs")) * (action != "create"),
    "--dry-run",
  )
  assert code == 2 and out == []
  assert err == (
    "gemma-jax launch: error: --zone 'us-west4-a': Cloud TPU offers v5p in "
    "us-central1-a, us-east5-a, us-east5-b, us-east5-c, us-south1-a, "
    "us-east1-d, europe-west4-b (cloud.google.com/tpu/docs/regions-zones); "
    "pick one of those, or run without --dry-run (gcloud knows zones added "
    "since)\n"
  )
  assert not (tmp_path / "logs").exists()
