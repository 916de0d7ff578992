"""The code blocks of a Markdown file: Python blocks run as pasted, shell blocks read as commands.

``python markdown_blocks.py BLOCKS.json WORK RESULTS.json REPO`` runs each Python block of
``BLOCKS.json`` in one interpreter, in a fresh namespace and a fresh folder under ``WORK`` that
holds the repository's shipped ``recipes/`` (as a clone's root does), and writes what each printed
and the traceback of each that failed to ``RESULTS.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
#: What a clone's root holds that README's Python blocks may read.
SHIPPED = ("recipes",)


@dataclass(frozen=True)
class Block:
    """A fenced code block: its language, the line of its opening fence (1-based) and its text."""

    language: str
    line: int
    text: str


def code_blocks(path: Path, language: str) -> list[Block]:
    """The ``language`` code blocks of the Markdown file ``path``, in order."""
    text = path.read_text()
    return [
        Block(match.group(1), text.count("\n", 0, match.start()) + 1, match.group(2))
        for match in FENCE.finditer(text)
        if match.group(1) == language
    ]


def shell_commands(text: str) -> list[list[str]]:
    """The commands of a shell block as argument lists: continued lines joined, comments dropped, ``&&`` split."""
    commands: list[list[str]] = []
    for line in text.replace("\\\n", " ").splitlines():
        words: list[str] = []
        for word in shlex.split(line, comments=True):
            if word == "&&":
                commands.append(words)
                words = []
            else:
                words.append(word)
        if words:
            commands.append(words)
    return commands


def run_blocks(blocks: list[Block], work: Path, repo: Path, source: str = "README.md") -> list[dict]:
    """Run each Python block as a fresh ``__main__`` in its own folder: what it printed, its traceback if it
    failed, and how long it ran.

    Tracebacks name ``source`` and the block's own line numbers in it.
    """
    results = []
    for block in blocks:
        folder = work / f"line{block.line}"
        folder.mkdir(parents=True)
        for name in SHIPPED:
            (folder / name).symlink_to(repo / name, target_is_directory=True)
        os.chdir(folder)
        printed = io.StringIO()
        error = None
        code = compile("\n" * block.line + block.text, source, "exec")
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(printed):
                exec(code, {"__name__": "__main__"})
        except BaseException:
            error = traceback.format_exc()
        seconds = time.perf_counter() - start
        results.append({**asdict(block), "stdout": printed.getvalue(), "error": error, "seconds": seconds})
    return results


if __name__ == "__main__":
    blocks_file, work, results_file, repo = (Path(argument).resolve() for argument in sys.argv[1:])
    blocks = [Block(**block) for block in json.loads(blocks_file.read_text())]
    results_file.write_text(json.dumps(run_blocks(blocks, work, repo)))
