"""The errors a user can act on. The CLI prints each as one line.

    ConfigError       a config key, override or command-line value is wrong
                      (exit 2, like a usage error)
    CheckpointError   a checkpoint or export is missing, damaged or of
                      another model; names the directory and the tensor
    DataError         a data file, dataset or tokenizer cannot be used;
                      names the file
    TrainingStopped   training cannot go on (divergence, a lost peer)

Every message names what is wrong and where (the key, the file, the shape),
so that it reads on its own after `gemma-jax COMMAND: error: `.
"""

import errno

_OS_HINTS: dict[int | None, str] = {
  errno.EISDIR: " (a directory where a file was expected)",
  errno.ENOTDIR: " (a file where a directory was expected)",
  errno.ENOSPC: " (free some space and rerun; completed checkpoints and "
  "exports are kept whole)",
  errno.EACCES: " (check the permissions, or choose another path)",
  errno.EROFS: " (choose a writable path)",
}


def os_error_line(error: OSError) -> str:
  """'FILE: what went wrong (the fix)' of an OSError."""
  where = f"{error.filename}: " if error.filename else ""
  hint = _OS_HINTS.get(error.errno, "")
  return f"{where}{error.strerror or error}{hint}"


class GemmaJaxError(Exception):
  """Base of the errors above; `exit_code` is what the CLI exits with."""

  exit_code = 1


class ConfigError(GemmaJaxError, ValueError):
  """A config file, override or argument is invalid; the message names the
  key."""

  exit_code = 2


class CheckpointError(GemmaJaxError):
  """A checkpoint does not exist, is damaged, or holds another model."""


class DataError(GemmaJaxError):
  """A data source, dataset file or tokenizer cannot be read or used."""


class TrainingStopped(GemmaJaxError):
  """Training cannot go on (for example: too many non-finite steps)."""
