"""The package is a stack: every import points down, never up or sideways
into a later layer, and no module imports itself through others (README
"Layout", docs/architecture.md). The training core names no feature."""

import ast
import pathlib
import re

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
  {"train"},  # the core
  {"features"},  # plug into the core
  {"drivers", "evals", "launch"},  # drive the core and the features
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


def module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(PACKAGE.parent).with_suffix("")
  parts = rel.parts[:-1] if rel.parts[-1] == "__init__" else rel.parts
  return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
  """{module: gemma_jax modules it imports}, from the code (ast, imports
  inside functions too); `from gemma_jax.x import y` is an arrow to
  gemma_jax.x.y where that is a module, else to gemma_jax.x."""
  modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}

  def module_of(name):
    while name not in modules and "." in name:
      name = name.rsplit(".", 1)[0]
    return name if name in modules else None

  graph = {}
  for module, path in modules.items():
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names += [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        names += [f"{node.module}.{a.name}" for a in node.names]
    targets = {module_of(n) for n in names if n.startswith("gemma_jax.")}
    graph[module] = targets - {None, module}
  return graph


def test_the_import_graph_has_no_circle():
  graph = import_graph()
  done: set[str] = set()

  def visit(module, path):
    if module in path:
      cycle = path[path.index(module) :] + [module]
      raise AssertionError("an import circle: " + " -> ".join(cycle))
    if module in done:
      return
    for target in sorted(graph[module]):
      visit(target, path + [module])
    done.add(module)

  for module in sorted(graph):
    visit(module, [])


# The words of the features (gemma_jax.features), matched as words where
# letters end them (so 'remat' and 'schema' do not count, 'lora_base' does).
FEATURE_WORDS = re.compile(
  r"(?<![a-z])(lora|qlora|qat|quant\w*|distill\w*|ewc|fisher|ema|teacher)"
  r"(?![a-z])",
  re.IGNORECASE,
)
CORE = ("train/program.py", "train/step.py", "train/trainer.py")


def test_the_core_names_no_feature():
  found = [
    f"{name}:{i}: {m.group(0)}"
    for name in CORE
    for i, line in enumerate((PACKAGE / name).read_text().splitlines(), 1)
    for m in FEATURE_WORDS.finditer(line)
  ]
  assert not found, "feature names in the core:\n" + "\n".join(found)


def test_the_feature_words_pattern():
  words = lambda text: [m.group(0) for m in FEATURE_WORDS.finditer(text)]
  assert words("remat schema lora_base EMA distillation ewc") == [
    "lora",
    "EMA",
    "distillation",
    "ewc",
  ]


def test_train_holds_only_the_core():
  modules = sorted(p.stem for p in (PACKAGE / "train").glob("*.py"))
  assert len([m for m in modules if m not in ("__init__", "testing")]) <= 10
