"""The package is a stack: every import points down, never up or sideways
into a later layer (README "Layout")."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).parent.parent / "gemma_jax"

# Lower layers first; a module may import its own layer and those below.
LAYERS = (
  {
    "errors",
    "fileio",
    "configlib",
    "hardware",
    "hugepages",
    "tokenizer",
    "distributed",
  },
  {"model", "sharding"},
  {"data", "checkpoint"},
  {"train"},
  {"evals", "launch"},
  {"commands", "cli"},
)


def layer_of(module: str) -> int:
  """'gemma_jax.train.step' -> the layer of 'train'."""
  top = module.split(".")[1]
  for i, names in enumerate(LAYERS):
    if top in names:
      return i
  raise AssertionError(f"{module}: not in any layer; add it to LAYERS")


def imports(path: pathlib.Path):
  """gemma_jax modules imported anywhere in a file (also inside functions)."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    for name in names:
      if name.startswith("gemma_jax.") and name.count(".") >= 1:
        yield name


def test_every_import_points_down_the_stack():
  upward = []
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    module = ".".join(rel.parts)
    if module == "gemma_jax.__init__" or (
      module.endswith("__init__") and rel.parts[1] == "__init__"
    ):
      continue
    here = layer_of(module)
    for name in imports(path):
      try:
        there = layer_of(name)
      except AssertionError:
        continue  # `from gemma_jax.x import name` where name is an object
      if there > here:
        upward.append(f"{module} -> {name}")
  assert not upward, "imports up the stack:\n" + "\n".join(upward)


def test_every_top_level_module_has_a_layer():
  for path in PACKAGE.iterdir():
    if path.name.startswith(("_", ".")) or path.suffix not in (".py", ""):
      continue
    layer_of(f"gemma_jax.{path.stem}")
