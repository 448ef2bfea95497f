"""Mesh config: axis sizes inside a slice (ICI) and across slices (DCN)."""

import dataclasses

from gemma_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Parameter names come from the model
# (embed, vocab, heads, kv_heads, head_dim, mlp, layers); activation names
# carry an `act_` prefix. An empty tuple means replicated.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
  ("act_batch", ("data", "fsdp")),
  ("act_length", ()),
  ("act_embed", ()),
  ("act_heads", ("tensor",)),
  ("act_kv_heads", ("tensor",)),
  ("act_mlp", ("tensor",)),
  ("act_vocab", ("tensor",)),
  ("embed", ("fsdp",)),
  ("vocab", ("tensor",)),
  ("heads", ("tensor",)),
  ("kv_heads", ("tensor",)),
  ("mlp", ("tensor",)),
  ("head_dim", ()),
  ("layers", ()),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the data, fsdp and tensor axes; one per group may be -1."""

  ici_data: int = -1
  ici_fsdp: int = 1
  ici_tensor: int = 1
  dcn_data: int = 1
  dcn_fsdp: int = 1
  dcn_tensor: int = 1
  rules: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_RULES
  # Shard optimizer state over the data axes (ZeRO-style) even where the
  # parameters are replicated over them.
  shard_optimizer_over_data: bool = True

  def __post_init__(self):
    for group in ("ici", "dcn"):
      sizes = [getattr(self, f"{group}_{a}") for a in MESH_AXES]
      if sum(s == -1 for s in sizes) > 1:
        raise ConfigError(
          f"mesh: at most one {group}_* size may be -1, got "
          f"{dict(zip(MESH_AXES, sizes))}"
        )
      for a, s in zip(MESH_AXES, sizes):
        if s == 0 or s < -1:
          raise ConfigError(f"mesh.{group}_{a} must be positive or -1, got {s}")
    for name, axes in self.rules:
      for axis in axes:
        if axis not in MESH_AXES:
          raise ConfigError(
            f"mesh.rules: '{name}' maps to unknown mesh axis "
            f"{axis!r}; valid choices: {', '.join(MESH_AXES)}"
          )
