"""Where a node's settings come from besides its command line: a TOML file (`--config`) and
`RAFT_DEMO_*` environment variables, for every flag of a parser; and the JSON log format."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

ENV_PREFIX = "RAFT_DEMO_"
# A flag whose metavar is one of these takes a path; a relative one in a config file is taken
# relative to that file's directory, so a file can name its neighbours wherever it is run from.
PATH_METAVARS = frozenset({"FILE", "DIR", "PATH"})
_ENV_TRUE = frozenset({"1", "true"})
_ENV_FALSE = frozenset({"0", "false"})
# Marks a flag the command line did not give; the parser fills in everything else.
_UNSET: Any = object()


@dataclass
class _Setting:
    """One flag's value from the file or the environment, as command-line words."""

    action: argparse.Action
    # Prefixes its errors: the variable, or "file: key".
    where: str
    # Names it beside another source: the variable, or "key in file".
    label: str
    words: list[str] = field(default_factory=list)


def parse_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    config_flag: str = "--config",
) -> argparse.Namespace:
    """Parse `argv` with `parser`, taking every flag the command line leaves out from the
    environment (`RAFT_DEMO_<FLAG>`), then from the TOML file that `config_flag` names, then
    from the parser's defaults. Every value goes through the parser's own converters and
    choices; a bad one is reported through `parser.error`, naming the variable or file and key."""
    args = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if environ is None else environ
    actions = _settable_actions(parser)
    config_action = parser._option_string_actions.get(config_flag)
    given = _given_on_command_line(parser, args)

    from_env = _from_environment(parser, actions, env)
    config_path = given.get(config_action.dest) if config_action is not None else None
    if config_path is None and config_action is not None and config_action.dest in from_env:
        config_path = env[env_name(config_action)]
    from_file: dict[str, _Setting] = {}
    if config_path is not None:
        skip = {config_action.dest} if config_action is not None else set()
        from_file = _from_file(parser, actions, Path(config_path), skip)

    # Command line over environment over file; a flag the command line gives is left to it
    # entirely, so a repeatable flag does not gather values from several sources.
    chosen = {**from_file, **from_env}
    for dest in given:
        chosen.pop(dest, None)
    _check_exclusive_groups(parser, given, chosen)
    words = [word for setting in chosen.values() for word in setting.words]
    return parser.parse_args([*words, *args])


def option_name(action: argparse.Action) -> str:
    """The flag's name without dashes (`heartbeat-ms`): its TOML key and, upper-cased with
    underscores, the end of its environment variable."""
    longs = [o for o in action.option_strings if len(o) > 2 and o[1] == o[0]]
    return (longs or action.option_strings)[0].lstrip(action.option_strings[0][0])


def env_name(action: argparse.Action) -> str:
    return ENV_PREFIX + option_name(action).upper().replace("-", "_")


def _settable_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if a.option_strings
        and a.dest != argparse.SUPPRESS
        and not isinstance(a, argparse._HelpAction | argparse._VersionAction)
    ]


def _accumulates(action: argparse.Action) -> bool:
    """Whether the action adds to what earlier occurrences stored (append, count)."""
    accumulating = (argparse._AppendAction, argparse._AppendConstAction, argparse._CountAction)
    return isinstance(action, accumulating)


def _given_on_command_line(parser: argparse.ArgumentParser, args: list[str]) -> dict[str, Any]:
    """The flags `args` gives, by dest, parsed with the parser's own rules except that required
    flags may be missing here (the file or environment may supply them)."""
    relaxed: list[Any] = [*parser._actions, *parser._mutually_exclusive_groups]
    required = [item.required for item in relaxed]
    namespace = argparse.Namespace()
    for action in parser._actions:
        if action.dest != argparse.SUPPRESS:
            # Accumulating actions start from None; the rest from a marker no default can equal.
            setattr(namespace, action.dest, None if _accumulates(action) else _UNSET)
    try:
        for item in relaxed:
            item.required = False
        parser.parse_args(args, namespace)
    finally:
        for item, was in zip(relaxed, required, strict=True):
            item.required = was
    return {
        dest: value
        for dest, value in vars(namespace).items()
        if value is not _UNSET and value is not None
    }


def _from_environment(
    parser: argparse.ArgumentParser, actions: list[argparse.Action], env: Mapping[str, str]
) -> dict[str, _Setting]:
    settings: dict[str, _Setting] = {}
    for action in actions:
        name = env_name(action)
        raw = env.get(name, "")
        # An empty variable counts as unset, so `RAFT_DEMO_X= command` clears an exported one.
        if raw == "":
            continue
        setting = _Setting(action, name, name)
        if action.nargs == 0:
            _switch_words(setting, _env_switch(parser, name, action, raw))
        else:
            multiple = action.nargs not in (None, argparse.OPTIONAL)
            _value_words(parser, setting, shlex.split(raw) if multiple else [raw])
        settings[action.dest] = setting
    return settings


def _env_switch(
    parser: argparse.ArgumentParser, name: str, action: argparse.Action, raw: str
) -> bool | int:
    word = raw.strip().lower()
    if isinstance(action, argparse._CountAction):
        if word.isdigit():
            return int(word)
        _error(parser, f"{name}: expected a count (0, 1, 2, ...), not {raw!r}")
    if word in _ENV_TRUE:
        return True
    if word in _ENV_FALSE:
        return False
    _error(parser, f"{name}: expected 1, 0, true or false, not {raw!r}")


def _from_file(
    parser: argparse.ArgumentParser,
    actions: list[argparse.Action],
    path: Path,
    skip: set[str],
) -> dict[str, _Setting]:
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        _error(parser, f"cannot read config file {path}: {e.strerror or e}")
    except tomllib.TOMLDecodeError as e:
        _error(parser, f"{path}: not valid TOML: {e}")
    except UnicodeDecodeError as e:
        _error(parser, f"{path}: not valid TOML: not UTF-8 text ({e.reason})")
    by_key: dict[str, argparse.Action] = {}
    for action in actions:
        name = option_name(action)
        by_key[name] = by_key[name.replace("-", "_")] = action
    settings: dict[str, _Setting] = {}
    keys: dict[str, str] = {}
    for key, value in table.items():
        found = by_key.get(key)
        if found is None:
            _error(parser, f"{path}: unknown key {key!r}: {parser.prog} has no flag --{key}")
        action = found
        if action.dest in skip:
            _error(parser, f"{path}: {key}: a config file cannot name another config file")
        if action.dest in keys:
            _error(parser, f"{path}: {keys[action.dest]} and {key} set the same flag")
        keys[action.dest] = key
        setting = _Setting(action, f"{path}: {key}", f"{key} in {path}")
        if action.nargs == 0:
            _switch_words(setting, _file_switch(parser, setting, value))
        else:
            occurrences = value if _accumulates(action) and isinstance(value, list) else [value]
            for occurrence in occurrences:
                words = _file_words(parser, setting, occurrence)
                if action.metavar in PATH_METAVARS:
                    words = [str(path.parent.absolute() / w) if w else w for w in words]
                _value_words(parser, setting, words)
        settings[action.dest] = setting
    return settings


def _file_switch(parser: argparse.ArgumentParser, setting: _Setting, value: Any) -> bool | int:
    if isinstance(setting.action, argparse._CountAction):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        _error(parser, f"{setting.where}: expected a count (0, 1, 2, ...), not {value!r}")
    if isinstance(value, bool):
        return value
    _error(parser, f"{setting.where}: expected true or false, not {_describe(value)}")


def _file_words(parser: argparse.ArgumentParser, setting: _Setting, value: Any) -> list[str]:
    """One occurrence of a flag's value(s) from TOML as the strings the command line would hold."""
    multiple = setting.action.nargs not in (None, argparse.OPTIONAL)
    items = value if multiple and isinstance(value, list) else [value]
    if isinstance(value, list) and not multiple:
        _error(parser, f"{setting.where}: expected one value, not a list")
    words = []
    for item in items:
        # A TOML boolean is not a number or a word here, even where str() would make it one.
        if isinstance(item, str | int | float) and not isinstance(item, bool):
            words.append(str(item))
        else:
            _error(parser, f"{setting.where}: expected a string or number, not {_describe(item)}")
    return words


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return repr(value)
    return f"{value!r} ({type(value).__name__})"


def _switch_words(setting: _Setting, value: bool | int) -> None:
    action = setting.action
    if isinstance(action, argparse.BooleanOptionalAction):
        # Its option strings are --x and --no-x; which one was meant is the value.
        on, off = action.option_strings[0], action.option_strings[1]
        setting.words = [on if value else off]
    elif isinstance(action, argparse._CountAction):
        setting.words = [action.option_strings[0]] * int(value)
    else:
        # A switch is either given or not; false leaves the parser's default alone.
        setting.words = [action.option_strings[0]] if value else []


def _value_words(parser: argparse.ArgumentParser, setting: _Setting, words: list[str]) -> None:
    """Check `words` as the parser would on the command line, then add them as one occurrence."""
    action = setting.action
    try:
        parser._get_values(action, list(words))
    except argparse.ArgumentError as e:
        _error(parser, f"{setting.where}: {e.message}")
    except (TypeError, ValueError) as e:
        _error(parser, f"{setting.where}: {e}")
    option = action.option_strings[0]
    if len(words) == 1 and action.nargs in (None, argparse.OPTIONAL):
        # Joined to its flag, a value that starts with '-' cannot be mistaken for a flag.
        joiner = "=" if option[:2] == option[0] * 2 else ""
        setting.words += [option + joiner + words[0]]
    else:
        setting.words += [option, *words]


def _check_exclusive_groups(
    parser: argparse.ArgumentParser, given: Mapping[str, Any], chosen: Mapping[str, _Setting]
) -> None:
    """A mutually exclusive group keeps its rule across sources: two of its flags set anywhere
    (command line, environment, file) are an error that says where each came from."""
    for group in parser._mutually_exclusive_groups:
        # (rank of the source, where): named strongest source first.
        present: list[tuple[int, str]] = []
        for action in group._group_actions:
            setting = chosen.get(action.dest)
            if action.dest in given:
                present.append((0, f"{action.option_strings[0]} on the command line"))
            elif setting is not None and setting.words:
                # An environment variable is named alike in errors and beside other sources.
                present.append((1 if setting.label == setting.where else 2, setting.label))
        if len(present) > 1:
            (_, first), (_, second) = sorted(present)[:2]
            _error(parser, f"{first} and {second} exclude each other")


def _error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.error(message)


# ---- logs ---------------------------------------------------------------------------------

# The fields a node's narrator puts on each record (see raft_node._Narrator).
NODE_FIELDS = ("node", "role", "term")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record: ts (ISO 8601, UTC), level, logger, msg; the node's id, role
    and term as their own keys when the node narrates it; exc_info as text. Never raises."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            return self._format(record)
        except Exception as e:  # a log line must never take the node down
            return json.dumps(
                {"level": "ERROR", "logger": "logging", "msg": f"unformattable log record: {e!r}"}
            )

    def _format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except Exception:
            # A format string and arguments that do not fit: show both rather than nothing.
            message = f"{record.msg!r} % {record.args!r}"
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        fields = {name: getattr(record, name) for name in NODE_FIELDS if hasattr(record, name)}
        if len(fields) == len(NODE_FIELDS):
            prefix = f"[{fields['node']} {fields['role']} t={fields['term']}] "
            if message.startswith(prefix):
                message = message[len(prefix) :]
        line["msg"] = message
        line.update(fields)
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc_info"] = record.exc_text
        if record.stack_info:
            line["stack_info"] = record.stack_info
        # default=str: an odd field value is shown as text instead of failing the line.
        return json.dumps(line, default=str)
