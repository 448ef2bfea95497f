"""Training checkpoints: orbax CheckpointManager over (state, meta).

Each checkpoint directory `DIR/checkpoints/<step>/` holds two items:

  state  the TrainState pytree (params, optimizer state, step, RNG, the
         non-finite counter), saved sharded by every process;
  meta   JSON: the resolved run config, the data pipeline's `describe()`
         (its sources, stages and tokenizer fingerprint), the step, whether
         the checkpoint is good and why (gemma_jax.train.state), and
         every array's shape and checksum.

The data position needs no state of its own: batches are a pure function of
the step. Orbax writes each step into a temporary directory and renames it
when every process has finished (on gs://, where nothing can be renamed, it
writes in place and marks the step complete with a `commit_success.txt`
written last; an unmarked step is not listed), so a process killed in the
middle of a save leaves the previous checkpoint intact; older steps are
deleted only after a newer one is complete, and the newest good one is kept
past `keep`.

A checkpoint torn afterwards (a file deleted or truncated, metadata cut
short) is found before or while restoring and reported as CheckpointDamaged
naming the file or array; `restore_newest_intact` then sets it aside and
falls back to the one before it. One of another model or optimizer is a
CheckpointError naming the first array that differs.
"""

import ast
import dataclasses
import datetime
import json
import logging
import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from gemma_jax import fileio
from gemma_jax.checkpoint import publish  # noqa: F401  (orbax's array writer)
from gemma_jax.errors import CheckpointError, os_error_line
from gemma_jax.train import state as state_lib
from gemma_jax.train.config import CheckpointConfig

# 2: the learning rate is an injected hyperparameter; 3: meta holds the
# arrays' shapes and checksums and whether the checkpoint is good.
FORMAT_VERSION = 3
DAMAGED_DIR = "checkpoints.damaged"
DISCARDED_DIR = "checkpoints.discarded"
# A tensorstore/orbax failure that means a file is missing or torn (not a
# checkpoint of another model).
_DAMAGE = re.compile(
  r"NOT_FOUND|OUT_OF_RANGE|DATA_LOSS|FAILED_PRECONDITION|"
  r"Error reading|error while reading|Error opening|"
  r"No such file|Unexpected end|corrupt|decod",
  re.I,
)


class CheckpointDamaged(CheckpointError):
  """A checkpoint's files are missing, torn or do not match their checksums.

  Attributes: step, and `file` (the file or array that is damaged).
  """

  def __init__(self, directory: str, step: int, file: str, reason: str):
    self.step, self.file = step, file
    super().__init__(
      f"checkpoint {directory}/{step} is damaged: {file}: {reason}"
    )


@dataclasses.dataclass(frozen=True)
class Restored:
  state: Any
  meta: dict


def _path_key(path) -> str:
  """('params', 'layers', ...) as orbax's _METADATA writes tree paths."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return str(tuple(parts))


def _shapes(tree) -> dict[str, list[int]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_key(p): list(x.shape) for p, x in flat}


class _KeepNewestGood:
  """Orbax preservation policy: keeps the newest good checkpoint even when
  `keep` newer (not good) ones would push it out."""

  def __init__(self, checkpointer: "Checkpointer"):
    self._ckpt = checkpointer

  def should_preserve(self, checkpoints, *, context):
    del context
    good = self._ckpt.newest_good_step()
    return [c.step == good for c in checkpoints]


class Checkpointer:
  """Saves and restores training state under `directory`.

  Saves are asynchronous when `cfg.async_save`: `save` returns once the
  arrays are copied off the devices and training continues while orbax
  writes them. Call `close()` (or `wait()`) before exiting. `read_only`
  (eval and other readers) never creates or deletes anything.
  """

  def __init__(
    self, directory: str, cfg: CheckpointConfig, read_only: bool = False
  ):
    self.directory = fileio.absolute(directory)
    self.read_only = read_only
    if read_only and not epath.Path(self.directory).is_dir():
      raise CheckpointError(f"no checkpoint directory {self.directory}")
    self._metas: dict[int, dict] = {}
    self._good: dict[int, bool] = {}
    self._pending: int | None = None  # the step a background save writes
    self._failed = False  # a save failed and was reported
    # Orbax may only log a background save's failure (and skip the step):
    # its log's errors are the pending save's.
    self._errors = _LoggedErrors()
    if not read_only:
      logging.getLogger("absl").addHandler(self._errors)
    self._manager = ocp.CheckpointManager(
      self.directory, options=self._options(cfg), item_names=("state", "meta")
    )

  def _options(self, cfg) -> ocp.CheckpointManagerOptions:
    if self.read_only:
      return ocp.CheckpointManagerOptions(read_only=True, create=False)
    # When to save is the trainer's (a hook every checkpoint.save_every
    # steps, and at the end or on SIGTERM); every save is forced past
    # orbax's own interval check.
    cm = ocp.checkpoint_managers
    return ocp.CheckpointManagerOptions(
      enable_async_checkpointing=cfg.async_save,
      create=True,
      # The newest `keep`, and the newest good one (see gemma_jax.train.state).
      preservation_policy=cm.AnyPreservationPolicy(
        [cm.LatestN(n=cfg.keep), _KeepNewestGood(self)]
      ),
      # Leftover `*.orbax-checkpoint-tmp-*` directories of a killed save.
      cleanup_tmp_directories=True,
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, meta: dict) -> None:
    """Starts saving `state` at `step`; a step saved before is an error
    (never silently kept or overwritten). Meta gets the arrays' shapes and
    checksums; `meta["good"]["good"]` marks a good checkpoint."""
    if step in self._manager.all_steps():
      raise CheckpointError(
        f"checkpoint {self.directory}/{step} already exists; not overwriting it"
      )
    meta = {
      "format_version": FORMAT_VERSION,
      "step": step,
      **meta,
      "shapes": _shapes(state),
      "checksums": state_lib.checksums(state),
    }
    self._finish()  # the previous save's failure is the previous step's
    self._errors.clear()
    self._metas[step] = meta
    self._good[step] = bool(meta.get("good", {}).get("good", False))
    self._pending = step
    self._finish_on_error(
      lambda: self._manager.save(
        step,
        force=True,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
        ),
      )
    )

  def check(self) -> None:
    """Reports a background save that failed as soon as it has ended (the
    trainer calls it every step; it never waits for a save in progress)."""
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self._finish()

  def _finish(self) -> None:
    """Waits for the pending save; CheckpointError naming its step if it
    failed."""
    if self._pending is not None:
      self._finish_on_error(self._manager.wait_until_finished)
      self._finish_on_error(self._errors.raise_first)
      self._pending = None

  def _finish_on_error(self, fn) -> None:
    """Runs `fn` (a save, or the wait for one); a failure is the pending
    step's, reported once in one line."""
    try:
      fn()
    except Exception as e:
      step, self._pending, self._failed = self._pending, None, True
      raise save_failed(self.directory, step, e) from None

  # Goodness (see gemma_jax.train.state).
  def good(self, step: int) -> dict | None:
    """The `good` record of a checkpoint; None for one saved before they
    were recorded, or whose meta cannot be read."""
    try:
      return self.restore_meta(step).get("good")
    except CheckpointError:
      return None

  def is_good(self, step: int) -> bool:
    """Whether checkpoint `step` is good; one whose meta cannot be read is
    not, one saved before goodness was recorded (format < 3, saved only
    from finite states) is."""
    if step not in self._good:
      try:
        meta = self.restore_meta(step)
      except CheckpointError:
        return False
      record = meta.get("good")
      self._good[step] = (
        bool(record.get("good"))
        if isinstance(record, dict)
        else meta.get("format_version", 0) < 3
      )
    return self._good[step]

  def newest_good_step(self) -> int | None:
    for step in sorted(self._manager.all_steps(), reverse=True):
      if self.is_good(step):
        return step
    return None

  # Restoring.
  def restore_meta(self, step: int | None = None) -> dict:
    step = self._step_or_latest(step)
    if step in self._metas:
      return self._metas[step]
    path = os.path.join(self._step_dir(step), "meta", "metadata")
    meta = self._read_json(step, path)
    self._metas[step] = meta
    return meta

  def restore(self, abstract_state, step: int | None = None) -> Restored:
    """Restores onto the shardings of `abstract_state`.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings
    (`TrainProgram.abstract_state`), so a checkpoint saved on one mesh
    restores onto another. Raises CheckpointDamaged (naming the file or
    array) for missing, torn or corrupted files, and CheckpointError when
    the checkpoint holds another model or optimizer state.
    """
    step = self._step_or_latest(step)
    meta = self.restore_meta(step)
    self._check_files(step)
    saved = self._saved_shapes(step, meta)
    legacy = _legacy_extras(saved, abstract_state)
    saved = _renamed(saved, legacy)
    self._check_structure(step, saved, abstract_state)
    try:
      restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_legacy_target(abstract_state, legacy))
        ),
      )
    except Exception as e:  # orbax/tensorstore raise many
      text = str(e)
      if "shapes" in meta or _DAMAGE.search(text):
        raise CheckpointDamaged(
          self.directory, step, _culprit(text), _first_line(text)
        ) from None
      raise self._mismatch(step, f"{type(e).__name__}: {text[:300]}") from None
    state = _from_legacy(restored.state, legacy)
    if "checksums" in meta:
      bad = state_lib.mismatched(
        _renamed_checksums(meta["checksums"], legacy),
        state_lib.checksums(state),
      )
      if bad:
        raise CheckpointDamaged(
          self.directory,
          step,
          f"array {bad[0]}",
          f"its data does not match the checksum saved with it "
          f"({len(bad)} arrays differ)",
        )
    return Restored(state=state, meta=meta)

  def set_aside(self, step: int, folder: str) -> str:
    """Moves checkpoint `step` to `folder`/<step> (never deletes it);
    returns where it went."""
    dest = os.path.join(folder, str(step))
    if epath.Path(dest).exists():
      stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
      dest = f"{dest}.{stamp}"
    fileio.move_directory(self._step_dir(step), dest)
    self._metas.pop(step, None)
    self._good.pop(step, None)
    self._manager.reload()
    return dest

  def wait(self):
    self._finish()
    self._manager.wait_until_finished()

  def close(self):
    reported = self._failed
    try:
      self._finish()
      self._manager.close()
    except Exception:
      if not reported:  # else: reported once already, where it failed
        raise
    finally:
      logging.getLogger("absl").removeHandler(self._errors)

  # Checks.
  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _rel(self, path: str) -> str:
    """`path` inside the checkpoint directory, for messages."""
    return path[len(self.directory) :].lstrip("/")

  def _read_json(self, step: int, path: str) -> dict:
    try:
      data = json.loads(epath.Path(path).read_text())
    except FileNotFoundError:
      raise CheckpointDamaged(
        self.directory, step, self._rel(path), "missing"
      ) from None
    except (ValueError, UnicodeDecodeError) as e:
      raise CheckpointDamaged(
        self.directory, step, self._rel(path), f"not valid JSON ({e})"
      ) from None
    if not isinstance(data, dict):
      raise CheckpointDamaged(
        self.directory, step, self._rel(path), "not a JSON object"
      )
    return data

  def _check_files(self, step: int) -> None:
    """The files orbax needs before it reads any array."""
    state = os.path.join(self._step_dir(step), "state")
    tree = self._read_json(step, os.path.join(state, "_METADATA"))
    if tree.get("use_ocdbt", True):
      manifest = os.path.join(state, "manifest.ocdbt")
      if not _nonempty_file(manifest):
        raise CheckpointDamaged(
          self.directory, step, self._rel(manifest), "missing or empty"
        )
    if not isinstance(tree.get("tree_metadata"), dict):
      raise CheckpointDamaged(
        self.directory,
        step,
        f"{step}/state/_METADATA",
        "holds no tree metadata",
      )

  def _saved_shapes(self, step: int, meta: dict) -> dict:
    """{array path (as `_path_key`): shape} of the checkpoint; for versions
    before meta held shapes, the paths from orbax's tree metadata, with
    shape None (unknown)."""
    if "shapes" in meta:
      return meta["shapes"]
    tree = json.loads(
      epath.Path(self._step_dir(step), "state", "_METADATA").read_text()
    )["tree_metadata"]
    return {
      k: None
      for k, v in tree.items()
      if (v.get("value_metadata") or {}).get("value_type")
    }

  def _check_structure(self, step: int, saved: dict, abstract_state) -> None:
    """CheckpointError naming the first array whose path or shape differs
    between the checkpoint (`saved`: `_saved_shapes`) and `abstract_state`
    (another model or optimizer)."""
    want = _shapes(abstract_state)
    for key in sorted(set(saved) | set(want)):
      if key not in saved:
        raise self._mismatch(step, f"array {key} is not in the checkpoint")
      if key not in want:
        raise self._mismatch(
          step,
          f"the checkpoint has an array {key} the configured state has not",
        )
      if saved[key] is not None and list(saved[key]) != list(want[key]):
        raise self._mismatch(
          step,
          f"array {key} has shape {saved[key]} in "
          f"the checkpoint, {want[key]} in the config",
        )

  def _mismatch(self, step: int, detail: str) -> CheckpointError:
    return CheckpointError(
      f"checkpoint {self.directory}/{step} does not match the configured "
      f"model/optimizer state ({detail}); use the config it was trained "
      f"with, or a fresh --workdir"
    )

  def _step_or_latest(self, step):
    if step is None:
      step = self.latest_step()
      if step is None:
        raise CheckpointError(f"no checkpoint found in {self.directory}")
    elif step not in self._manager.all_steps():
      steps = ", ".join(map(str, self.all_steps())) or "none"
      raise CheckpointError(
        f"no checkpoint at step {step} in {self.directory} (steps: {steps})"
      )
    return step


def restore_newest_intact(
  checkpointer: Checkpointer,
  abstract_state,
  check_meta=None,
  damaged_dir: str | None = None,
  warn=None,
):
  """(step, Restored) of the newest intact checkpoint; (None, None) when
  there is none at all.

  `check_meta(meta, step)` may raise (another model, another data stream):
  that propagates. A damaged checkpoint gets one `warn` line naming its
  file; it is moved to `damaged_dir`/<step> when given (never deleted), and
  the one before it is tried. If every checkpoint is damaged:
  CheckpointError.
  """
  warn = warn or (lambda m: None)
  damaged = []
  for step in reversed(checkpointer.all_steps()):
    try:
      meta = checkpointer.restore_meta(step)
      if check_meta is not None:
        check_meta(meta, step)
      return step, checkpointer.restore(abstract_state, step)
    except CheckpointDamaged as e:
      where = ""
      if damaged_dir is not None:
        where = f"; moved it to {checkpointer.set_aside(step, damaged_dir)}"
      warn(f"{e}{where}; trying the checkpoint before it")
      damaged.append(step)
  if damaged:
    kept = f" (moved to {damaged_dir})" if damaged_dir else ""
    raise CheckpointError(
      f"no intact checkpoint in {checkpointer.directory}: checkpoints "
      f"{', '.join(map(str, damaged))} are damaged{kept}"
    )
  return None, None


# Checkpoints written before TrainState.extras existed (gemma_jax up to
# commit 7003598) held a feature's per-step state as a top-level field of
# the state: the EMA of the weights was `ema`, today `extras["ema"]`. They
# restore into today's layout: such a field is read under its old path and
# moved into `extras`; its shapes and checksums are compared under the new.
def _legacy_extras(saved: dict, abstract_state) -> tuple[str, ...]:
  """The extras the checkpoint (`saved`: `_saved_shapes`) holds at the top
  level of the state."""
  names = (getattr(abstract_state, "extras", None) or {}).keys()
  tops = {_top(k) for k in saved}
  return tuple(n for n in names if n in tops)


def _top(path_key: str) -> str | None:
  """The top-level field of a `_path_key` ("('ema', 'w')" -> "ema")."""
  try:
    return ast.literal_eval(path_key)[0]
  except (ValueError, SyntaxError, TypeError, IndexError):
    return None


def _renamed(saved: dict, legacy: tuple[str, ...]) -> dict:
  """`saved` ({`_path_key`: shape}) with the paths under each legacy
  top-level field moved into extras."""
  return {
    (str(("extras",) + ast.literal_eval(k)) if _top(k) in legacy else k): v
    for k, v in saved.items()
  }


def _renamed_checksums(saved: dict, legacy: tuple[str, ...]) -> dict:
  """`saved` ({keystr: checksum}) likewise: ".ema['w']" ->
  ".extras['ema']['w']"."""
  out = {}
  for key, value in saved.items():
    name = next(
      (
        n
        for n in legacy
        if key == f".{n}" or key.startswith((f".{n}[", f".{n}."))
      ),
      None,
    )
    out[
      key if name is None else f".extras[{name!r}]" + key[len(name) + 1 :]
    ] = value
  return out


def _legacy_target(abstract_state, legacy: tuple[str, ...]):
  """What orbax restores into: `abstract_state`, or for a legacy
  checkpoint the same arrays as a dict with those extras at the top."""
  if not legacy:
    return abstract_state
  fields = {
    f.name: getattr(abstract_state, f.name)
    for f in dataclasses.fields(abstract_state)
    if f.name != "extras"
  }
  extras = dict(abstract_state.extras)
  rest = {n: x for n, x in extras.items() if n not in legacy}
  return (
    fields | {n: extras[n] for n in legacy} | ({"extras": rest} if rest else {})
  )


def _from_legacy(restored, legacy: tuple[str, ...]):
  """The TrainState of what `_legacy_target` restored."""
  if not legacy:
    return restored
  restored = dict(restored)
  extras = dict(restored.pop("extras", None) or {})
  extras |= {n: restored.pop(n) for n in legacy}
  return state_lib.TrainState(**restored, extras=extras)


class _LoggedErrors(logging.Handler):
  """The exceptions orbax logs (with their tracebacks) from its threads."""

  def __init__(self) -> None:
    super().__init__(logging.ERROR)
    self.errors: list[BaseException] = []

  def emit(self, record):
    if record.exc_info and record.exc_info[1] is not None:
      self.errors.append(record.exc_info[1])

  def clear(self):
    self.errors = []

  def raise_first(self):
    if self.errors:
      raise self.errors[0]


def save_failed(directory: str, step, error: BaseException) -> CheckpointError:
  """The one line for a save of checkpoint `step` that failed."""
  where = f"checkpoint {directory}/{step} was not saved"
  full = fileio.disk_full(error, f"{directory}/{step}")
  if full is not None:
    return CheckpointError(f"{where}: {os_error_line(full)}")
  return CheckpointError(
    f"{where}: {_first_line(str(error))}; the checkpoints before it are "
    f"whole (rerun to resume from the newest)"
  )


def _nonempty_file(path: str) -> bool:
  p = epath.Path(path)
  try:
    return p.is_file() and p.stat().length > 0
  except FileNotFoundError:
    return False


def _first_line(text: str) -> str:
  line = text.strip().splitlines()[0] if text.strip() else "unreadable"
  # orbax appends the repr of a bound method: noise, not detail
  return line.split(" See full TensorStore details")[0][:200]


def _culprit(text: str) -> str:
  """The array (or file) a tensorstore error names."""
  arrays = [
    p for p in re.findall(r"'path': '([^']+)'", text) if not p.startswith("/")
  ]
  if arrays:
    return f"array {arrays[-1].rstrip('/')}"
  key = re.search(r'Error reading "([^"/]+)/', text)
  if key:
    return f"array {key.group(1)}"
  return "array data"


def newest_good_advice(checkpointer, resume_word: str = "rerun") -> str:
  """What to do after a divergence or a bad checkpoint: a fix, then which
  checkpoint to rerun from (--from-step)."""
  checkpointer.wait()
  good = checkpointer.newest_good_step()
  fix = (
    "lower optimizer.learning_rate, add warmup or clip gradients "
    "(optimizer.grad_clip_norm)"
  )
  if good is None:
    return (
      f"no checkpoint is good: {fix}, then {resume_word} with "
      f"--from-step 0 to start over (checkpoints are moved to "
      f"WORKDIR/{DISCARDED_DIR}, not deleted)"
    )
  return (
    f"the newest good checkpoint is step {good}: {fix}, then "
    f"{resume_word} with --from-step {good} (later checkpoints are "
    f"moved to WORKDIR/{DISCARDED_DIR}, not deleted)"
  )
