"""How the Lightning commands report a user's mistake: ``error: <message>`` as the last line of stderr.

``mambaout fit|validate|test|predict`` stop on :data:`USER_ERRORS` (bad data, checkpoints, names
from files, output paths, exports, a diverged loss) and on the argument parser's refusals with that
one line and exit status 2, without a traceback or the parser's usage; ``MAMBAOUT_PL_VERBOSE=1``
prints the traceback above it. The parser's messages are re-worded by :func:`describe_parser_error`
to name the key, the recipe file or command-line argument it came from and what is allowed;
:func:`check_recipe_files` names a recipe that is not valid YAML before the parser reads it.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml
from lightning.pytorch.cli import LightningArgumentParser

from mambaout_pl.data.errors import DataError
from mambaout_pl.errors import (
    CheckpointError,
    ExportError,
    NonFiniteLossError,
    OutputExistsError,
    OutputPathError,
    OutputWriteError,
    SettingsError,
)
from mambaout_pl.models.registry import UnknownModelError, UntrustedNameError

__all__ = [
    "USER_ERRORS",
    "VERBOSE_VARIABLE",
    "ConciseArgumentParser",
    "ParserError",
    "check_recipe_files",
    "constructor_message",
    "describe_parser_error",
    "exit_with_error",
    "user_error",
]

#: Errors a user's data, files or settings cause; their messages say what to change.
USER_ERRORS: tuple[type[BaseException], ...] = (
    DataError,
    CheckpointError,
    UntrustedNameError,
    UnknownModelError,
    OutputPathError,
    OutputExistsError,
    OutputWriteError,
    ExportError,
    NonFiniteLossError,
    SettingsError,
)
#: Set to 1 to see the traceback above the one-line error.
VERBOSE_VARIABLE = "MAMBAOUT_PL_VERBOSE"
_CONFIG_OPTIONS = ("--config", "-c")
_WRAPPERS = ("init_args", "dict_kwargs")


class ParserError(SystemExit):
    """An argument or recipe the parser refused: exit status 2, the parser's ``message`` and the keys it knows."""

    def __init__(self, message: str, known_keys: Sequence[str] = ()) -> None:
        super().__init__(2)
        self.message = message
        self.known_keys = list(known_keys)


class ConciseArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, raising :class:`ParserError` where it would print its usage and exit."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # a parser that reports to its caller
            super().error(message, ex)
        raise ParserError(message, _known_keys(self)) from ex


def _known_keys(parser: Any) -> list[str]:
    """The keys ``parser`` and its subcommands' parsers take."""
    keys = [action.dest for action in parser._actions if isinstance(action.dest, str)]
    subcommands = getattr(parser, "_subcommands_action", None)
    for subparser in getattr(subcommands, "_name_parser_map", {}).values():
        keys += _known_keys(subparser)
    return keys


def user_error(error: BaseException) -> BaseException | None:
    """``error``, or the user error that caused it (the parser re-raises a constructor's error as a ValueError)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, USER_ERRORS):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def constructor_message(error: BaseException) -> str:
    """The message of the error a constructor raised, without the parser's wrapping (its dump of every setting)."""
    messages = []
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        if text and "Given value" not in text and "Does not validate against" not in text:
            messages.append(text)
        error = error.__cause__ or error.__context__
    return messages[-1] if messages else _innermost_reason(text)


def exit_with_error(message: str) -> NoReturn:
    """Print ``error: message`` (the traceback above it with ``MAMBAOUT_PL_VERBOSE=1``) and exit with status 2."""
    if os.environ.get(VERBOSE_VARIABLE, "") not in ("", "0"):
        traceback.print_exc()
    sys.stdout.flush()
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# -- recipes --------------------------------------------------------------------------------------


def recipe_files(argv: Sequence[str]) -> list[str]:
    """The ``--config`` values of a command line, in order."""
    files = []
    for position, argument in enumerate(argv):
        name, equals, value = argument.partition("=")
        if name in _CONFIG_OPTIONS and equals:
            files.append(value)
        elif argument in _CONFIG_OPTIONS and position + 1 < len(argv):
            files.append(argv[position + 1])
    return files


def check_recipe_files(argv: Sequence[str]) -> None:
    """Raise :class:`ParserError` naming a ``--config`` file that does not exist, is not YAML or not a mapping."""
    for value in recipe_files(argv):
        path = Path(value)
        if not path.is_file():
            if not any(mark in value for mark in ("\n", "{", ": ")):  # not a config given inline
                raise ParserError(f"Recipe file '{value}' does not exist: give the path of a recipe YAML file.")
            continue
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error)
            raise ParserError(f"Recipe '{value}' is not valid YAML{where}: {problem}. Fix the file.") from error
        except (OSError, UnicodeDecodeError) as error:
            raise ParserError(f"Cannot read recipe '{value}': {error}.") from error
        if content is not None and not isinstance(content, dict):
            raise ParserError(
                f"Recipe '{value}' holds a {type(content).__name__}, not keys and values (trainer:, model:, data:)."
            )


# -- the parser's messages ------------------------------------------------------------------------

_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_DOES_NOT_ACCEPT = re.compile(r"(?:Subcommand|Group) '([^']+)' does not accept option '([^']+)'")
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)'")
_EXPECTED = re.compile(r"Expected a (?:<class '([^']+)'>|typing\.Literal\[([^\]]*)\])")
_GOT_VALUE = re.compile(r"Got value: (.*)$", re.MULTILINE)
_GIVEN_VALUE = re.compile(r"Given value: (.*)$", re.MULTILINE)
_MISSING_FILE = re.compile(r'Parser key "config": File does not exist: (.+)')


def describe_parser_error(error: ParserError, argv: Sequence[str]) -> str:
    """One line for a parser refusal: the key, where it was given (recipe file or command line), and the fix."""
    message = error.message
    subcommand = next((argument for argument in argv if not argument.startswith("-")), "fit")
    keys = _PARSER_KEY.findall(message)
    missing = _MISSING_FILE.search(message)
    if missing:
        return f"Recipe file {missing.group(1)} does not exist: give the path of a recipe YAML file."
    unknown = _NOT_ACCEPTED.search(message)
    nested = _DOES_NOT_ACCEPT.search(message)
    if unknown or nested:
        if unknown:
            parents = [key for key in keys if key != "config"]
            name = unknown.group(1)
            key = ".".join([*parents, name])
            class_path = _CLASS_PATH.search(message)
            owner = class_path.group(1) if class_path else None
            candidates = _class_arguments(owner) if owner else error.known_keys
        else:
            group, name = nested.groups()
            key = name if group == subcommand else f"{group}.{name}"
            owner, candidates = None, error.known_keys
        return _unknown_key(key, name, owner, candidates, argv, subcommand)
    if keys and (_GOT_VALUE.search(message) or _GIVEN_VALUE.search(message)):
        key = ".".join(key for key in keys if key != "config")
        expected = _EXPECTED.findall(_innermost_block(message))
        types = [name for name, _ in expected if name and name != "NoneType" and not name.startswith("jsonargparse")]
        choices = ", ".join(choice for _, choice in expected if choice)
        allowed = " or ".join([*dict.fromkeys(types), *([f"one of {choices}"] if choices else [])])
        allowed += " or null" if any(name == "NoneType" for name, _ in expected) else ""
        values = _GOT_VALUE.findall(message) or _GIVEN_VALUE.findall(message)
        value = values[0].strip() if values else "?"
        detail = f"it must be {allowed}" if types or choices else _innermost_reason(message)
        return f"Invalid value {value!r} for '{key}'{key_source(key, argv)}: {detail}."
    if message.startswith("unrecognized arguments: "):
        first = message.removeprefix("unrecognized arguments: ").split()[0]
        if first.startswith("--"):
            key = first[2:].partition("=")[0]
            return _unknown_key(key, key, None, error.known_keys, argv, subcommand)
        return f"{message[0].upper()}{message[1:]}: not a command or option of `mambaout` (see `mambaout --help`)."
    return _innermost_reason(message)


def _unknown_key(
    key: str, name: str, owner: str | None, candidates: Sequence[str], argv: Sequence[str], subcommand: str
) -> str:
    text = f"Unknown key '{key}'{key_source(key, argv)}"
    if owner:
        text += f": {owner} has no argument '{name.split('.')[-1]}'"
    close = difflib.get_close_matches(name if owner else key, [str(c) for c in candidates], n=1, cutoff=0.6)
    if close:
        text += f" (did you mean '{close[0]}'?)"
    return f"{text}. `mambaout {subcommand} --help` lists every key."


def _innermost_block(message: str) -> str:
    """The lines under the message's last ``Parser key`` line (the innermost key's own errors)."""
    lines = message.splitlines()
    start = max(index for index, line in enumerate(lines) if _PARSER_KEY.search(line))
    indent = len(lines[start]) - len(lines[start].lstrip())
    block = []
    for line in lines[start + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        block.append(line)
    return "\n".join(block)


def _innermost_reason(message: str) -> str:
    """The parser's message without its dumps of the value given, as one line."""
    lines = [line.strip(" -") for line in message.splitlines()]
    kept = [line for line in lines if line and not line.startswith(("Given value", "Subtypes:", "Errors:"))]
    return "; ".join(kept)


def key_source(key: str, argv: Sequence[str]) -> str:
    """`` on the command line (ARG)`` or `` in recipe 'FILE'`` for the argument or recipe that sets ``key``."""
    wanted = _plain(key)
    for argument in argv:
        if argument.startswith("--") and _plain(argument[2:].partition("=")[0]) == wanted:
            return f" on the command line ({argument})"
    for value in recipe_files(argv):
        try:
            content = yaml.safe_load(Path(value).read_text())
        except (OSError, ValueError, yaml.YAMLError):
            continue
        if _holds(content, wanted.split(".")):
            return f" in recipe '{value}'"
    return ""


def _plain(key: str) -> str:
    """A dotted key without the ``init_args`` / ``dict_kwargs`` levels (``--model.init_args.lr`` is ``--model.lr``)."""
    return ".".join(part for part in key.split(".") if part not in _WRAPPERS)


def _holds(content: Any, parts: list[str]) -> bool:
    if not parts:
        return True
    if not isinstance(content, dict):
        return False
    if parts[0] in content and _holds(content[parts[0]], parts[1:]):
        return True
    return any(_holds(content[wrapper], parts) for wrapper in _WRAPPERS if wrapper in content)


def _class_arguments(class_path: str) -> list[str]:
    """The constructor arguments of an already imported class (nothing is imported here)."""
    module_name, _, name = class_path.rpartition(".")
    cls = getattr(sys.modules.get(module_name), name, None)
    return sorted(set(_constructor_arguments(cls))) if inspect.isclass(cls) else []


def _constructor_arguments(cls: type) -> Iterator[str]:
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        yield from (p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return
