"""README.md and docs/ stay true to the code: every `gemma-jax` command they
show names a subcommand that exists and only flags its parser accepts, every
relative link (and #anchor) resolves, and the README stays a front door.

Commands are read from fenced code blocks (a shell line that starts with
`gemma-jax`, after any VAR=value assignments; backslash continuations
joined, `# comments` dropped) and from inline code spans that start with
`gemma-jax` (prose and tables). Flags are checked against the argparse
parsers `gemma-jax` itself builds (gemma_jax.cli._parser), in process.
"""

import argparse
import functools
import pathlib
import re

import pytest

from gemma_jax import cli

ROOT = pathlib.Path(__file__).parent.parent
PAGES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
README_MAX_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_COMMAND = re.compile(r"`(gemma-jax\s[^`]*)`")
ENV_PREFIX = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*")
FLAG = re.compile(r"^[\[(]*(--[A-Za-z][\w-]*)")
HELP_FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
SCRIPT = re.compile(r"^(?:taskset -c \S+ )?python (scripts/\w+\.py)\s*(.*)$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def split_fences(text: str):
  """(prose lines, code lines) of a markdown text, each as (number, line)."""
  prose, code, inside = [], [], False
  for number, line in enumerate(text.splitlines(), 1):
    if FENCE.match(line):
      inside = not inside
      continue
    (code if inside else prose).append((number, line))
  return prose, code


def _joined(lines):
  """Code lines with backslash continuations joined, comments dropped."""
  pending, start = "", None
  for number, line in lines:
    line = re.sub(r"(^|\s)#.*$", "", line)
    if start is None:
      start = number
    if line.rstrip().endswith("\\"):
      pending += line.rstrip()[:-1] + " "
      continue
    yield start, pending + line
    pending, start = "", None


def script_problems(text: str) -> list:
  """Flags given to `python scripts/X.py` that X.py does not define."""
  found = []
  for number, line in _joined(split_fences(text)[1]):
    match = SCRIPT.match(ENV_PREFIX.sub("", line.strip()))
    if not match:
      continue
    script = ROOT / match.group(1)
    if not script.exists():
      found.append(f"line {number}: {match.group(1)}: no such script")
      continue
    source = script.read_text()
    for token in match.group(2).split():
      flag = FLAG.match(token)
      if flag and f'"{flag.group(1)}"' not in source:
        name = match.group(1)
        found.append(f"line {number}: {name} has no flag {flag.group(1)}")
  return found


def commands(text: str):
  """(line number, tokens after `gemma-jax`) of every command in a page."""
  prose, code = split_fences(text)
  for number, line in _joined(code):
    line = ENV_PREFIX.sub("", line.strip().removeprefix("$ "))
    if line.startswith("gemma-jax "):
      yield number, line.split()[1:]
  # A code span may wrap onto the next line: search the prose as one text.
  lines = [""] * (len(text.splitlines()) + 1)
  for number, line in prose:
    lines[number] = line
  prose_text = "\n".join(lines)
  for match in INLINE_COMMAND.finditer(prose_text):
    number = prose_text.count("\n", 0, match.start())
    yield number, match.group(1).split()[1:]


@functools.cache
def command_parser(name: str) -> argparse.ArgumentParser:
  """The full parser of one top-level subcommand, as `gemma-jax` builds it."""
  root = cli._parser([name])
  return _subcommands(root)[name]


def _subcommands(parser) -> dict:
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      return action.choices
  return {}


@functools.cache
def _flags(parser) -> set:
  """The flags `--help` lists (`--debug` stands anywhere on the line)."""
  return set(HELP_FLAG.findall(parser.format_help())) | {"--debug"}


def _is_placeholder(token: str) -> bool:
  """CMD, COMMAND, ..., `train:` (a message line, not a command)."""
  return token.isupper() or "..." in token or token.endswith(":")


def problems_in(tokens: list) -> list:
  """What is wrong with one command line (tokens after `gemma-jax`)."""
  parsers, path = None, []
  for token in tokens:
    if token.startswith("-") or token.startswith("["):
      break
    choices = (
      set(cli.COMMANDS)
      if parsers is None
      else set().union(*(_subcommands(p) for p in parsers))
    )
    if not choices:
      break
    if _is_placeholder(token):
      if parsers is None:
        return []  # `gemma-jax CMD ...`, `gemma-jax train: error: ...`
      break
    names = token.split("|")
    unknown = [n for n in names if n not in choices]
    if unknown:
      where = " ".join(["gemma-jax", *path])
      return [f"`{where}` has no subcommand {unknown[0]!r}"]
    if parsers is None:
      parsers = [command_parser(n) for n in names]
    else:
      parsers = [_subcommands(p)[n] for p in parsers for n in names]
    path.append(token)
  if parsers is None:
    return []
  found = []
  for token in tokens:
    match = FLAG.match(token)
    if not match:
      continue
    flag = match.group(1)
    for parser in parsers:
      if flag not in _flags(parser):
        found.append(f"`{parser.prog}` has no flag {flag}")
  return found


def check_text(text: str) -> list:
  """Every problem with the commands of one markdown text."""
  return [
    f"line {number}: {problem}"
    for number, tokens in commands(text)
    for problem in problems_in(tokens)
  ]


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped."""
  text = heading.strip().lower()
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: pathlib.Path) -> set:
  prose, _ = split_fences(path.read_text())
  seen, found = {}, set()
  for _, line in prose:
    match = re.match(r"^#{1,6}\s+(.*?)\s*#*$", line)
    if match:
      base = slug(match.group(1))
      count = seen.get(base, 0)
      seen[base] = count + 1
      found.add(base if count == 0 else f"{base}-{count}")
  return found


def broken_links(page: pathlib.Path) -> list:
  prose, _ = split_fences(page.read_text())
  found = []
  for number, line in prose:
    line = re.sub(r"`[^`]*`", "", line)  # code spans hold no links
    for target in LINK.findall(line):
      if re.match(r"^[a-z]+:", target):  # https:, mailto:
        continue
      file, _, anchor = target.partition("#")
      path = (page.parent / file).resolve() if file else page
      if not path.exists():
        found.append(f"line {number}: {target}: no such file")
      elif anchor and path.suffix == ".md" and anchor not in anchors(path):
        found.append(f"line {number}: {target}: no heading #{anchor}")
  return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_documented_command_and_flag_exists(page):
  assert check_text(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_documented_script_flag_exists(page):
  assert script_problems(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
  assert broken_links(page) == []


def test_the_pages_show_commands_at_all():
  """The extraction finds what it should (else the checks above are
  vacuous): README's table, a continued line, an inline span."""
  readme = [tokens for _, tokens in commands(PAGES[0].read_text())]
  assert ["eval", "--workdir", "runs/tiny"] in readme
  sample = "```bash\ngemma-jax train c.yaml \\\n    --steps 3   # note\n```\n"
  assert list(commands(sample)) == [(2, ["train", "c.yaml", "--steps", "3"])]
  wrapped = "Run\n`gemma-jax eval\n--workdir d`.\n"
  assert list(commands(wrapped)) == [(2, ["eval", "--workdir", "d"])]


def test_a_made_up_flag_or_subcommand_is_found():
  assert check_text("```bash\ngemma-jax train c.yaml --workdir d\n```") == []
  text = "```\nJAX_PLATFORMS=cpu gemma-jax train c.yaml --no-such-flag 1\n```"
  assert check_text(text) == [
    "line 2: `gemma-jax train` has no flag --no-such-flag"
  ]
  assert check_text("Run `gemma-jax trian c.yaml`.") == [
    "line 1: `gemma-jax` has no subcommand 'trian'"
  ]
  nested = "`gemma-jax launch status|logs --name n --zone z --steps 3`"
  assert check_text(nested) == [
    "line 1: `gemma-jax launch status` has no flag --steps",
    "line 1: `gemma-jax launch logs` has no flag --steps",
  ]
  assert check_text("```\ngemma-jax train: error: unknown key\n```") == []
  script = "```bash\npython scripts/bench_train.py --batch 8 --no-such 1\n```"
  assert script_problems(script) == [
    "line 2: scripts/bench_train.py has no flag --no-such"
  ]


def test_a_broken_link_is_found(tmp_path):
  page = tmp_path / "page.md"
  page.write_text("# Top\n[ok](#top) [bad](#nowhere) [gone](missing.md)\n")
  assert broken_links(page) == [
    "line 2: #nowhere: no heading #nowhere",
    "line 2: missing.md: no such file",
  ]


def test_readme_is_a_front_door():
  lines = len(PAGES[0].read_text().splitlines())
  assert lines <= README_MAX_LINES, (
    f"README.md has {lines} lines; keep it under {README_MAX_LINES} and "
    f"move the depth into docs/"
  )
