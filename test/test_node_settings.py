"""A node's settings from a `--config` TOML file and `RAFT_DEMO_*` variables (precedence, checks,
errors), the JSON log format, and the deployment examples under deploy/ kept valid."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest

import node_flags
import node_settings
from cluster_config import ClusterConfig
from raft_node import HANDOVER_TIMEOUTS, _Narrator
from rpc import raft_pb2
from test.cluster_process import REPO_ROOT, find_free_port_block
from test.conftest import Stubs, wait_until

DEPLOY = REPO_ROOT / "deploy"
NODE_FILES = sorted((DEPLOY / "three-hosts").glob("node-*.toml"))


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees only the RAFT_DEMO_* variables it sets itself."""
    for name in list(os.environ):
        if name.startswith(node_settings.ENV_PREFIX):
            monkeypatch.delenv(name)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def parse(argv: Sequence[str]) -> argparse.Namespace:
    return node_flags.parse_node_args(list(argv))


def refused(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line with which the node's flag parsing exits 2."""
    with pytest.raises(SystemExit) as stopped:
        parse(argv)
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# ---- sources and precedence ----------------------------------------------------------------


def test_command_line_beats_environment_beats_file_beats_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(tmp_path / "node.toml", "port = 20001\nfirst_port = 20001\nheartbeat_ms = 100\n")
    assert parse(["--port", "20001", "--first-port", "20001"]).heartbeat_ms == 200
    assert parse(["--config", str(config)]).heartbeat_ms == 100
    monkeypatch.setenv("RAFT_DEMO_HEARTBEAT_MS", "150")
    assert parse(["--config", str(config)]).heartbeat_ms == 150
    assert parse(["--config", str(config), "--heartbeat-ms", "175"]).heartbeat_ms == 175
    # The rest of the file still counts where nothing overrides it.
    assert parse(["--config", str(config), "--heartbeat-ms", "175"]).port == 20001


def test_config_file_named_by_environment_and_command_line_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_env = write(tmp_path / "env.toml", "port = 20001\nfirst_port = 20001\n")
    from_flag = write(tmp_path / "flag.toml", "port = 20002\nfirst_port = 20002\n")
    monkeypatch.setenv("RAFT_DEMO_CONFIG", str(from_env))
    assert parse([]).port == 20001
    assert parse(["--config", str(from_flag)]).port == 20002


def test_both_spellings_of_a_key_and_toml_types(tmp_path: Path) -> None:
    config = write(
        tmp_path / "node.toml",
        'port = "20001"\nfirst-port = 20001\nelection-timeout-min-ms = 300\n'
        'election_timeout_max_ms = 600\nlog-format = "json"\n',
    )
    args = parse(["--config", str(config)])
    assert (args.port, args.first_port) == (20001, 20001)
    assert (args.election_timeout_min_ms, args.election_timeout_max_ms) == (300, 600)
    assert args.log_format == "json"


def test_relative_paths_in_the_file_are_taken_from_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    config = write(etc / "node.toml", 'id = 1\ncluster = "cluster.toml"\ndata_dir = "data/1"\n')
    monkeypatch.chdir(tmp_path)
    args = parse(["--config", "etc/node.toml"])
    assert Path(args.cluster) == etc.absolute() / "cluster.toml"
    assert Path(args.data_dir) == etc.absolute() / "data" / "1"
    # An absolute path stays as it is; relative paths elsewhere are the user's own, from the cwd.
    write(config, f'id = 1\ncluster = "{tmp_path / "c.toml"}"\n')
    assert Path(parse(["--config", str(config)]).cluster) == tmp_path / "c.toml"
    assert parse(["--config", str(config), "--data-dir", "d"]).data_dir == "d"
    monkeypatch.setenv("RAFT_DEMO_DATA_DIR", "e")
    assert parse(["--config", str(config)]).data_dir == "e"


def test_every_flag_reads_alike_from_every_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whatever flags the parser has, each takes a value from the environment and the file
    exactly as from the command line: the same result, or the same refusal."""
    parser = node_flags.build_parser()
    actions = [
        a
        for a in parser._actions
        if a.option_strings and not isinstance(a, argparse._HelpAction) and a.dest != "config"
    ]
    grouped = {a for g in parser._mutually_exclusive_groups for a in g._group_actions}
    checked = 0
    for action in actions:
        flag = action.option_strings[0]
        key = node_settings.option_name(action)
        # Members of the required group satisfy it themselves; any other flag needs --port.
        base = [] if action in grouped else ["--port", "20001", "--first-port", "20001"]
        samples: list[str | None] = (
            [None] if action.nargs == 0 else ["7", "-3", "INFO", "json", "/srv/x", "", "x y"]
        )
        for sample in samples:
            if sample is None:
                command_line, env, toml = [flag], "1", f"{key} = true\n"
            else:
                command_line, env, toml = [flag, sample], sample, f"{key} = {json.dumps(sample)}\n"
            config = write(tmp_path / "f.toml", toml)
            from_command_line = _outcome(parser, [*command_line, *base], {})
            from_env = _outcome(parser, base, {node_settings.env_name(action): env})
            from_file = _outcome(parser, ["--config", str(config), *base], {})
            if sample and action.metavar in node_settings.PATH_METAVARS:
                # In a file, a relative path is taken from the file's directory.
                resolved = str(tmp_path.absolute() / sample)
                assert from_file == _outcome(parser, [flag, resolved, *base], {}), (flag, sample)
            else:
                assert from_file == from_command_line, (flag, sample, from_file)
            # An empty variable counts as unset.
            if sample != "":
                assert from_env == from_command_line, (flag, sample, from_env)
            capsys.readouterr()
            checked += 1
    assert checked >= len(actions)


def _outcome(
    parser: argparse.ArgumentParser, argv: list[str], env: Mapping[str, str]
) -> dict[str, Any] | str:
    try:
        args = vars(node_settings.parse_args(parser, argv, env))
    except SystemExit as e:
        return f"exit {e.code}"
    args.pop("config")
    return args


# ---- errors --------------------------------------------------------------------------------

BAD_FILES = {
    "unknown key": ("port = 20001\nhearbeat_ms = 5\n", "hearbeat_ms"),
    "not a number": ('port = "twelve"\n', "port"),
    "not a choice": ('port = 20001\nlog_level = "LOUD"\n', "log_level"),
    "float for an int": ("port = 20001\nheartbeat_ms = 1.5\n", "heartbeat_ms"),
    "boolean for a value": ("port = true\n", "port"),
    "list for one value": ("port = [20001]\n", "port"),
    "a table": ("[port]\nx = 1\n", "port"),
    "both spellings": ("port = 20001\nheartbeat_ms = 1\nheartbeat-ms = 2\n", "heartbeat-ms"),
    "a config file naming another": ('port = 20001\nconfig = "other.toml"\n', "config"),
    "not TOML": ("port = [\n", "not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_config_file_is_one_line_naming_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    text, named = BAD_FILES[case]
    config = write(tmp_path / "node.toml", text)
    line = refused(["--config", str(config)], capsys)
    assert str(config) in line and named in line, line


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = refused(["--config", str(tmp_path / "nope.toml")], capsys)
    assert "nope.toml" in line and "No such file" in line


BAD_VARIABLES = {
    "RAFT_DEMO_HEARTBEAT_MS": "fast",
    "RAFT_DEMO_LOG_FORMAT": "xml",
    "RAFT_DEMO_NODES": "1.5",
}


@pytest.mark.parametrize("name", sorted(BAD_VARIABLES))
def test_bad_variable_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    monkeypatch.setenv(name, BAD_VARIABLES[name])
    line = refused(["--port", "20001", "--first-port", "20001"], capsys)
    assert name in line and repr(BAD_VARIABLES[name]) in line, line


def test_exclusive_flags_stay_exclusive_across_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path / "node.toml", f'id = 1\ncluster = "{tmp_path}/c.toml"\n')
    line = refused(["--config", str(config), "--port", "20001"], capsys)
    assert "--port on the command line" in line and f"id in {config}" in line, line
    monkeypatch.setenv("RAFT_DEMO_PORT", "20001")
    line = refused(["--config", str(config)], capsys)
    assert "RAFT_DEMO_PORT" in line and f"id in {config}" in line, line
    # The same flag from two sources is no conflict: the stronger source wins.
    monkeypatch.delenv("RAFT_DEMO_PORT")
    monkeypatch.setenv("RAFT_DEMO_ID", "2")
    assert parse(["--config", str(config)]).id == 2
    # With no member of the required group from any source, the usual error.
    monkeypatch.delenv("RAFT_DEMO_ID")
    line = refused(["--cluster", str(tmp_path / "c.toml")], capsys)
    assert "--port --id is required" in line


def test_bad_config_file_from_a_real_process(tmp_path: Path) -> None:
    config = write(tmp_path / "node.toml", "id = 1\nheartbeat_ms = 'soon'\n")
    result = subprocess.run(
        [sys.executable, "raft_node.py"],
        cwd=REPO_ROOT,
        env=_env({"RAFT_DEMO_CONFIG": str(config)}),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"raft_node.py: error: {config}: heartbeat_ms: invalid int value: 'soon'\n"
    ), result.stderr


# ---- the layer on any parser: switches, counts, lists ----------------------------------------


def _toy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy", exit_on_error=False)
    parser.error = _raise  # type: ignore[method-assign]
    parser.add_argument("--config", metavar="FILE")
    parser.add_argument("--fsync", action="store_true")
    parser.add_argument("--no-color", dest="color", action="store_false")
    parser.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("--peer", action="append", metavar="HOST:PORT")
    parser.add_argument("--pair", nargs=2, type=int)
    parser.add_argument("--include", action="append", metavar="DIR")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--fast", action="store_true")
    mode.add_argument("--safe", action="store_true")
    return parser


class _Refused(Exception):
    pass


def _raise(message: str) -> Any:
    raise _Refused(message)


def toy(argv: list[str], env: Mapping[str, str], toml: str | None, tmp: Path) -> dict[str, Any]:
    if toml is not None:
        argv = ["--config", str(write(tmp / "toy.toml", toml)), *argv]
    return vars(node_settings.parse_args(_toy_parser(), argv, env))


def test_switches_counts_and_lists(tmp_path: Path) -> None:
    defaults = toy([], {}, None, tmp_path)
    assert defaults["fsync"] is False and defaults["color"] is True and defaults["probe"] is True
    from_file = toy(
        [],
        {},
        "fsync = true\nno_color = true\nprobe = false\nverbose = 2\n"
        'peer = ["a:1", "b:2"]\npair = [3, 4]\ninclude = ["lib", "/usr/lib"]\n',
        tmp_path,
    )
    assert from_file["fsync"] is True and from_file["color"] is False
    assert from_file["probe"] is False and from_file["verbose"] == 2
    assert from_file["peer"] == ["a:1", "b:2"] and from_file["pair"] == [3, 4]
    assert from_file["include"] == [str(tmp_path / "lib"), "/usr/lib"]
    env = {
        "RAFT_DEMO_FSYNC": "0",
        "RAFT_DEMO_PROBE": "TRUE",
        "RAFT_DEMO_VERBOSE": "3",
        "RAFT_DEMO_PEER": "c:3",
        "RAFT_DEMO_PAIR": "5 6",
    }
    over = toy([], env, "fsync = true\nprobe = false\nverbose = 1\npeer = ['a:1']\n", tmp_path)
    assert over["fsync"] is False and over["probe"] is True and over["verbose"] == 3
    assert over["peer"] == ["c:3"] and over["pair"] == [5, 6]
    # A repeatable flag on the command line replaces the other sources' values, not adds to them.
    assert toy(["--peer", "d:4"], env, "peer = ['a:1']\n", tmp_path)["peer"] == ["d:4"]
    assert toy(["-vv"], env, None, tmp_path)["verbose"] == 2


def test_switch_values_are_checked(tmp_path: Path) -> None:
    for env, toml in [
        ({"RAFT_DEMO_FSYNC": "yes please"}, None),
        ({"RAFT_DEMO_VERBOSE": "-1"}, None),
        ({}, 'fsync = "true"\n'),
        ({}, "fsync = 1\n"),
        ({}, "verbose = true\n"),
        ({}, "pair = ['x', 1]\n"),
    ]:
        with pytest.raises(
            _Refused, match=r"RAFT_DEMO_(FSYNC|VERBOSE)|toy.toml: (fsync|verbose|pair)"
        ):
            toy([], env, toml, tmp_path)


def test_exclusive_switches_count_only_when_on(tmp_path: Path) -> None:
    assert toy([], {"RAFT_DEMO_SAFE": "false"}, "fast = true\n", tmp_path)["fast"] is True
    with pytest.raises(_Refused, match="RAFT_DEMO_SAFE and fast in .*toy.toml exclude each other"):
        toy([], {"RAFT_DEMO_SAFE": "1"}, "fast = true\n", tmp_path)
    with pytest.raises(_Refused, match="--safe on the command line and RAFT_DEMO_FAST"):
        toy(["--safe"], {"RAFT_DEMO_FAST": "true"}, None, tmp_path)


# ---- logs --------------------------------------------------------------------------------------


class _FakeNode:
    node_id = 3
    role = "leader"
    current_term = 7


@contextmanager
def captured(formatter: logging.Formatter) -> Iterator[io.StringIO]:
    """What the "raft" logger writes at INFO and above while in the block, in `formatter`'s form."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("raft")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    # Only this handler: the test runner's own log capture would choke on the odd messages.
    logger.propagate = False
    try:
        yield stream
    finally:
        logger.propagate = True
        logger.setLevel(level)
        logger.removeHandler(handler)


def test_narration_in_text_is_unchanged_and_in_json_has_the_node_fields() -> None:
    narrate = _Narrator(cast(Any, _FakeNode()))
    with captured(logging.Formatter("%(levelname)s %(message)s")) as text:
        narrate.info("won the election with votes from %s", "1, 2, 3")
    assert text.getvalue() == "INFO [3 leader t=7] won the election with votes from 1, 2, 3\n"
    with captured(node_settings.JsonLogFormatter()) as out:
        narrate.warning("commit index now %d", 12, extra={"peer": 4})
        logging.getLogger("raft").info("a line not from a node")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["msg"] == "commit index now 12"
    assert (first["node"], first["role"], first["term"]) == (3, "leader", 7)
    assert first["level"] == "WARNING" and first["logger"] == "raft"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", first["ts"])
    assert second["msg"] == "a line not from a node" and "node" not in second


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")

    def __repr__(self) -> str:
        raise RuntimeError("no")


def test_json_log_lines_survive_odd_messages() -> None:
    logger = logging.getLogger("raft")
    with captured(node_settings.JsonLogFormatter()) as out:
        logger.info("%d of %d", "x")
        logger.info(["not", "a", "string"])
        logger.info('quote " newline \n tab \t lone surrogate \udcff, ünïcode')
        logger.info(_Unprintable())
        logger.info("value %s", _Unprintable())
        try:
            raise ValueError("broken")
        except ValueError:
            logger.exception("it failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 6, lines
    parsed = [json.loads(line) for line in lines]
    assert parsed[0]["msg"] == "'%d of %d' % ('x',)"
    assert parsed[1]["msg"] == "['not', 'a', 'string']"
    assert "\n" in parsed[2]["msg"] and "ünïcode" in parsed[2]["msg"]
    assert parsed[5]["msg"] == "it failed" and "ValueError: broken" in parsed[5]["exc_info"]


# ---- the deployment examples -------------------------------------------------------------------


def test_deploy_node_files_are_valid_settings() -> None:
    assert [p.name for p in NODE_FILES] == ["node-1.toml", "node-2.toml", "node-3.toml"]
    cluster_file = DEPLOY / "three-hosts" / "cluster.toml"
    cluster = ClusterConfig.from_toml(cluster_file)
    assert sorted(cluster.nodes) == [1, 2, 3]
    hosts = {n.raft_address.split(":")[0] for n in cluster.nodes.values()}
    assert len(hosts) == 3
    for path in NODE_FILES:
        args = parse(["--config", str(path)])
        node_id = int(path.stem.split("-")[1])
        assert args.id == node_id
        assert Path(args.cluster) == cluster_file.absolute()
        cluster.node(node_id)
        assert args.data_dir.startswith("/var/lib/raft-demo/")


def _unit() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (DEPLOY / "raft-demo@.service").read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_runs_a_node_from_its_config_file() -> None:
    unit = _unit()
    (exec_start,) = unit["ExecStart"]
    words = shlex.split(exec_start)
    assert words[1].endswith("/raft_node.py")
    assert "/etc/raft-demo/%i.toml" in words
    # The unit's own flags with an example file in place of the instance's.
    flags = [str(NODE_FILES[0]) if w == "/etc/raft-demo/%i.toml" else w for w in words[2:]]
    assert parse(flags).id == 1
    assert unit["Restart"] == ["on-failure"]
    # A leader's hand-over on SIGTERM must fit in the stop timeout, with the example timings.
    longest_election_ms = parse(flags).election_timeout_max_ms
    assert int(unit["TimeoutStopSec"][0]) > HANDOVER_TIMEOUTS * longest_election_ms / 1000 + 5
    assert unit["ReadWritePaths"] == ["/var/lib/raft-demo"]


def test_the_documented_example_config_is_valid(tmp_path: Path) -> None:
    page = (REPO_ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    section = page.split("## Configuration", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    args = parse(["--config", str(write(tmp_path / "node-1.toml", example))])
    assert args.id == 1 and args.log_format == "json" and args.heartbeat_ms == 100


# ---- real processes ----------------------------------------------------------------------------


def _env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(node_settings.ENV_PREFIX)}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@contextmanager
def node_process(
    argv: list[str], env: Mapping[str, str], stderr: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A `raft_node.py` process, run from the repository root; stopped on every way out."""
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "raft_node.py", *argv],
            cwd=REPO_ROOT,
            env=_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def single_node_files(directory: Path, extra: str = "") -> tuple[Path, str]:
    """A one-node cluster file and a node config file naming it and a data dir by relative paths;
    the node's client address."""
    first = find_free_port_block(2)
    client = f"127.0.0.1:{first + 1}"
    write(
        directory / "cluster.toml",
        f'[[node]]\nid = 1\nraft = "127.0.0.1:{first}"\nclient = "{client}"\n',
    )
    config = write(
        directory / "node.toml",
        'id = 1\ncluster = "cluster.toml"\ndata_dir = "data"\nheartbeat_ms = 50\n'
        f"election_timeout_min_ms = 150\nelection_timeout_max_ms = 300\n{extra}",
    )
    return config, client


def _read(log: Path) -> str:
    return log.read_text(encoding="utf-8", errors="replace")


async def serves(stubs: Stubs, client: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    async def wrote() -> bool:
        assert proc.poll() is None, _read(log)
        info = await stubs.leader_info(client)
        if info is None or info.leader_id != 1:
            return False
        reply = await stubs.cluster(client).ProposeMapping(
            raft_pb2.Mapping(key="configured", value="yes"), timeout=5
        )
        return bool(reply.success)

    await wait_until(wrote, 20, "the node elects itself and takes a write")
    assert await stubs.value(client, "configured") == "yes"


async def test_node_started_from_environment_and_config_file_serves(
    tmp_path: Path, stubs: Stubs
) -> None:
    config, client = single_node_files(tmp_path, 'log_level = "WARNING"\n')
    log = tmp_path / "stderr.log"
    # The file comes from RAFT_DEMO_CONFIG; an environment variable overrides its log level.
    env = {"RAFT_DEMO_CONFIG": str(config), "RAFT_DEMO_LOG_LEVEL": "INFO"}
    with node_process([], env, log) as proc:
        await serves(stubs, client, proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, _read(log)
    narration = _read(log)
    assert "[1 leader t=" in narration and "won the election" in narration, narration
    # data_dir = "data" was taken from the config file's directory, not the node's cwd.
    assert (tmp_path / "data" / "log").is_file()


async def test_json_logs_from_a_real_node_are_json_with_the_node_fields(
    tmp_path: Path, stubs: Stubs
) -> None:
    config, client = single_node_files(tmp_path)
    log = tmp_path / "stderr.log"
    with node_process(["--config", str(config), "--log-format", "json"], {}, log) as proc:
        await serves(stubs, client, proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, _read(log)
    lines = _read(log).splitlines()
    assert len(lines) >= 4, lines
    records = [json.loads(line) for line in lines]
    for record in records:
        assert {"ts", "level", "logger", "msg", "node", "role", "term"} <= record.keys(), record
        assert record["node"] == 1 and not record["msg"].startswith("[1 ")
    assert any(
        r["role"] == "leader" and r["msg"].startswith("won the election") for r in records
    ), records


def test_json_logs_carry_a_startup_error_as_json(tmp_path: Path) -> None:
    config, _ = single_node_files(tmp_path, "log_format = 'json'\n")
    result = subprocess.run(
        [sys.executable, "raft_node.py", "--config", str(config), "--id", "9"],
        cwd=REPO_ROOT,
        env=_env({}),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR" and "node id 9 is not in the cluster" in record["msg"]
