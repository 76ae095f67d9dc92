"""The examples in README.md and docs/*.md run against today's code, so that the docs cannot drift from it.

Python blocks (```python) run as a reader would run them, with three substitutions, all here:

- Each file's blocks run in order in one namespace: a later block may use what an earlier one made (``gen``).
- They run on the tiny checkpoint instead of Z-Image-Turbo: ``ZIMAGE_MODEL`` names its folder (so
  ``Generator()`` and ``GeneratorPool()`` load it), and the hub id written in an example,
  ``"Tongyi-MAI/Z-Image-Turbo"``, is replaced by that folder's path. ``ZIMAGE_OFFLINE=1``: nothing is downloaded.
- They run in a fresh folder (what they save lands there), with progress bars off, on whatever device the
  test machine has (the CPU in CI).

A block that cannot run here (it needs a GPU, a Ray cluster, 20 GB of disk) is preceded by an HTML comment,
invisible on GitHub and on the site, that says why:

    <!-- docs-test: skip (needs a CUDA GPU) -->

Each such block is reported as a skipped test with that reason (``pytest -ra`` lists them). Shell blocks do
not run; their ``zimage-turbo`` command lines must name commands and options that exist.
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from zimage_turbo import Generator, GeneratorPool
from zimage_turbo.bench.runner import _parser as bench_parser
from zimage_turbo.cli import _parser as cli_parser
from zimage_turbo.settings import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")
_MARKER = re.compile(r"^<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")
_SKIP = re.compile(r"^skip \((?P<reason>[^)]+)\)$")
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")


@dataclass(frozen=True)
class Block:
    document: str
    line: int  # of the first line of code, 1-based
    language: str
    code: str
    skip: str | None  # why it does not run, from its marker

    @property
    def name(self) -> str:
        return f"{self.document}:{self.line}"


def blocks(document: str) -> list[Block]:
    """The fenced code blocks of ``document``, with their markers. A marker that is not on the line before a
    block, or that says anything but ``skip (reason)``, is an error: a typo must not run a block by accident."""
    lines = (ROOT / document).read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    marker: tuple[int, str] | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        if match := _MARKER.match(line):
            skip = _SKIP.match(match["body"])
            if skip is None:
                raise AssertionError(f"{document}:{index + 1}: write <!-- docs-test: skip (reason) -->, got {line}")
            marker = (index, skip["reason"])
        elif match := _FENCE.match(line):
            end = next(k for k in range(index + 1, len(lines)) if lines[k].rstrip() == "```")
            if marker is not None and marker[0] != index - 1:
                raise AssertionError(f"{document}:{marker[0] + 1}: a docs-test marker must be just before a block")
            code = "\n".join(lines[index + 1 : end]) + "\n"
            found.append(Block(document, index + 2, match["lang"], code, marker[1] if marker else None))
            marker, index = None, end
        index += 1
    if marker is not None:
        raise AssertionError(f"{document}:{marker[0] + 1}: a docs-test marker must be just before a block")
    return found


def python_blocks(document: str) -> list[Block]:
    return [block for block in blocks(document) if block.language == "python"]


DOCUMENTS_WITH_PYTHON = [document for document in DOCUMENTS if python_blocks(document)]
SKIPPED = [block for document in DOCUMENTS for block in python_blocks(document) if block.skip]


def test_the_documents_have_examples() -> None:
    # the collection above is what the tests below run: it must find the examples there are
    assert "README.md" in DOCUMENTS_WITH_PYTHON and "docs/usage.md" in DOCUMENTS_WITH_PYTHON
    assert sum(len(python_blocks(document)) for document in DOCUMENTS) >= 8


@pytest.mark.slow
@pytest.mark.parametrize("document", DOCUMENTS_WITH_PYTHON)
def test_python_examples_run(document: str, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZIMAGE_MODEL", str(tiny_checkpoint))
    monkeypatch.setenv("ZIMAGE_OFFLINE", "1")
    monkeypatch.setenv("ZIMAGE_PROGRESS", "false")
    namespace: dict[str, object] = {"__name__": "__docs__"}
    ran = 0
    try:
        for block in python_blocks(document):
            if block.skip:
                continue
            code = block.code
            for quote in "\"'":
                code = code.replace(f"{quote}{DEFAULT_MODEL}{quote}", repr(str(tiny_checkpoint)))
            # blank lines in front, so that a traceback names the line of the document
            exec(compile("\n" * (block.line - 1) + code, block.document, "exec"), namespace)
            ran += 1
    finally:
        for value in namespace.values():
            if isinstance(value, Generator | GeneratorPool):
                value.close()
    assert ran, f"every example of {document} is skipped"


@pytest.mark.parametrize("block", SKIPPED, ids=[block.name for block in SKIPPED])
def test_skipped_python_examples(block: Block) -> None:
    pytest.skip(f"{block.name}: {block.skip}")


def test_skips_are_few() -> None:
    # an example that does not run is one that can drift: keep them the exception
    every = [block for document in DOCUMENTS for block in python_blocks(document)]
    assert len(SKIPPED) <= 3 and len(SKIPPED) < len(every) / 3, [block.name for block in SKIPPED]


# -- command lines ------------------------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def command_lines(document: str) -> list[tuple[int, list[str]]]:
    """Every ``zimage-turbo ...`` command in the shell blocks of ``document``: its line and its arguments, up
    to a pipe; backslash continuations joined, comments and ``$`` prompts removed, ``[...]`` brackets of a
    synopsis dropped."""
    found = []
    for block in blocks(document):
        if block.language not in SHELL_LANGUAGES:
            continue
        text = block.code.replace("\\\n", " ")
        for offset, line in enumerate(text.splitlines()):
            if block.language == "console":
                if not line.startswith("$ "):
                    continue  # output
                line = line[2:]
            line = re.sub(r"\$\([^)]*\)", "X", line)  # $(command) is one word
            try:
                words = shlex.split(line, comments=True)
            except ValueError as error:
                raise AssertionError(f"{document}:{block.line + offset}: {error}") from None
            while words and re.match(r"^\w+=", words[0]):
                words.pop(0)  # VAR=value before the command
            if words[:1] != ["zimage-turbo"]:
                continue
            arguments = []
            for word in words[1:]:
                if word in ("|", "&&", ";", ">", "2>"):
                    break
                arguments.append(word.strip("[]"))
            found.append((block.line + offset, arguments))
    return found


def check_command(arguments: list[str]) -> str:
    """The subcommand of ``zimage-turbo ARGUMENTS``; an AssertionError if it or an option does not exist."""
    main = cli_parser()
    commands = _subcommands(main)
    words = iter(arguments)
    command = next((word for word in words if not word.startswith("-")), None)
    assert command in commands, f"no command {command!r} (there are {sorted(commands)})"
    parser = bench_parser() if command == "bench" else commands[command]
    for word in words:
        if word.startswith("-") and word != "-":
            option = word.split("=", 1)[0]
            assert option in parser._option_string_actions, f"{command} has no option {option}"
    return command


@pytest.mark.parametrize("document", [*DOCUMENTS, "CHANGELOG.md", "SECURITY.md"])
def test_command_lines_name_commands_and_options_that_exist(document: str) -> None:
    problems = []
    for line, arguments in command_lines(document):
        try:
            check_command(arguments)
        except AssertionError as error:
            problems.append(f"{document}:{line}: zimage-turbo {' '.join(arguments)}: {error}")
    assert not problems, "\n".join(problems)


def test_every_command_is_shown_in_the_readme() -> None:
    shown = {check_command(arguments) for _, arguments in command_lines("README.md")}
    assert shown == set(_subcommands(cli_parser())), "commands missing from the README's examples"


@pytest.mark.parametrize(
    "arguments",
    [["generat", "a fox"], ["generate", "a fox", "--sizes", "512x512"], ["bench", "--vram-gib", "4"]],
)
def test_a_wrong_command_line_is_caught(arguments: list[str]) -> None:
    with pytest.raises(AssertionError):
        check_command(arguments)
