"""A cheap fingerprint of a checkpoint directory, to notice that it changed.

    fingerprint("ckpt/fisher")  ->  "sha256:3f2a..." (hex)

It hashes, for every file under the directory in sorted order, its relative
path and size; the whole content of files up to SMALL bytes (configs,
metadata, orbax manifests); and of larger files the first and last BLOCK
bytes plus BLOCK bytes at SAMPLES evenly spaced offsets. So it reads at most
about (SAMPLES + 2) x 64 KiB per large file, wherever the checkpoint lives
(local disk or gs://), yet any rewrite of the checkpoint changes it: orbax
names its data files afresh on every save, and a re-export of other values
changes the sampled bytes. It is a guard against using a different file by
mistake, not a cryptographic proof of content: an edit confined to bytes
that are not sampled inside a large file keeps the fingerprint. Copying the
directory elsewhere keeps it.
"""

import hashlib

from etils import epath

SMALL = 1 << 20
BLOCK = 1 << 16
SAMPLES = 4


def _files(root: epath.Path) -> list[tuple[str, epath.Path]]:
  out = []
  stack = [root]
  while stack:
    d = stack.pop()
    for child in d.iterdir():
      if child.is_dir():
        stack.append(child)
      else:
        out.append((str(child.relative_to(root)), child))
  return sorted(out)


def _sample(path: epath.Path, size: int, h) -> None:
  if size <= SMALL:
    h.update(path.read_bytes())
    return
  offsets = [0] + [size * (k + 1) // (SAMPLES + 1) for k in range(SAMPLES)]
  offsets.append(size - BLOCK)
  with path.open("rb") as f:
    for off in offsets:
      f.seek(off)
      h.update(f.read(BLOCK))


def fingerprint(directory) -> str:
  """'sha256:<hex>' of `directory` (see the module docstring)."""
  root = epath.Path(directory)
  h = hashlib.sha256()
  for rel, path in _files(root):
    size = path.stat().length
    h.update(f"{rel}\0{size}\0".encode())
    _sample(path, size, h)
  return "sha256:" + h.hexdigest()
