"""launch/tpu_pod.sh: the gcloud commands it would run (--dry-run)."""

import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).parents[2]


def launch(*args):
  return subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), *args],
                        capture_output=True, text=True, cwd=ROOT)


def test_one_slice_copies_to_and_starts_on_every_worker():
  out = launch("--tpu", "pod", "--zone", "us-west4-a", "--project", "proj",
               "configs/tiny.yaml", "--workdir", "gs://bucket/run",
               "--set", "train.steps=5", "--dry-run")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[0].startswith("git archive")
  scp, ssh = lines[1], lines[2]
  assert scp.startswith("gcloud compute tpus tpu-vm scp ")
  assert "pod:" in scp and "--worker=all" in scp and "--project proj" in scp
  assert ssh.startswith("gcloud compute tpus tpu-vm ssh pod --worker=all")
  remote = ssh.replace("\\", "")
  for part in ("JAX_PLATFORMS=tpu", "GEMMA_JAX_EXTRAS=tpu",
               "GEMMA_JAX_DISTRIBUTED=1", "source launch/setup.sh",
               "gemma-jax train configs/tiny.yaml --workdir gs://bucket/run "
               "--set train.steps=5"):
    assert part in remote


def test_multi_slice_starts_every_node():
  out = launch("--tpu", "qr", "--slices", "2", "--zone", "z",
               "configs/tiny.yaml", "--workdir", "gs://b/r", "--dry-run")
  assert out.returncode == 0, out.stderr
  ssh = [l for l in out.stdout.splitlines() if " ssh " in l]
  assert [l.split()[5] for l in ssh] == ["qr-0", "qr-1"]


@pytest.mark.parametrize("args, message", [
    (["--tpu", "p", "--zone", "z", "configs/tiny.yaml", "--workdir", "/tmp/x"],
     "--workdir must be a gs:// path"),
    (["--tpu", "p", "--zone", "z", "nope.yaml", "--workdir", "gs://b/r"],
     "config file not found: nope.yaml"),
    (["--zone", "z", "configs/tiny.yaml", "--workdir", "gs://b/r"],
     "--tpu, --zone, CONFIG and --workdir are required"),
    (["--tpu", "p", "--zone", "z", "--slices", "0", "configs/tiny.yaml",
      "--workdir", "gs://b/r"], "--slices must be a positive integer"),
])
def test_bad_arguments_are_refused_before_any_gcloud_call(args, message):
  out = launch(*args, "--dry-run")
  assert out.returncode == 2 and message in out.stderr
  assert "gcloud" not in out.stdout
