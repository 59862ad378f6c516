"""The fault suite on real processes: a minute of kills, pauses and partitions must leave a
linearizable history and every acknowledged write; stale reads from an isolated leader must not pass;
and nothing the suite creates (namespaces, interfaces, proxies, nodes) outlives it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Hashable
from pathlib import Path

import pytest

from cluster_client import KeptLease
from test.fault_leases import PROBE_TTL, LeaseProbe, _Abandoned, _Kept
from test.fault_suite import (
    FINAL_CLIENT,
    SuiteOptions,
    SuiteResult,
    load_history,
    lost_writes,
    run_suite,
    save_history,
)
from test.fault_watch import LIBRARY, Change, _Watcher, check_watchers
from test.linearizability import CheckResult, History, Kind
from test.lock_workload import Section, check_sections
from test.nemesis import FAULT_KINDS, NAME_PREFIX, NemesisTiming, namespaces_available, sweep_stale

REPO = Path(__file__).resolve().parent.parent
# The run is reproducible in its choice of faults, not in its timing; another seed:
# RAFT_FAULT_SEED=N python -m pytest test/test_faults.py
SEED = int(os.environ.get("RAFT_FAULT_SEED", "4"))
# Shorter holds than the harness default, so that every kind of fault fits in one minute.
CI_TIMING = NemesisTiming(pause=(2.5, 4.0), down=(1.0, 3.0), partition=(3.0, 5.0), quiet=(1.0, 2.0))


def _explain(result: SuiteResult) -> str:
    return f"seed {result.options.seed}:\n{result.report}"


def _own_names(pid: int) -> list[str]:
    """Namespaces and interfaces named for the process `pid`."""
    tag = f"{NAME_PREFIX}{pid & 0xFFFFFF:06x}"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    listed += subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return sorted(set(re.findall(rf"\b{tag}[0-9a-f](?:n|h|p|br)\d*\b", listed)))


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and "raft_node.py" in cmdline:
            pids.append(int(entry.name))
    return pids


# -- the acknowledged-write check on its own --------------------------------------------------------


def _history(*ops: tuple[str, Kind, str, str | None, float, float | None, Hashable]) -> History:
    """(client, kind, key, value, invoke, complete or None for unknown, result) per operation."""
    history = History()
    for client, kind, key, value, invoke, complete, result in ops:
        op_id = history.invoke(client, kind, key, value, at=invoke)
        if complete is None:
            history.unknown(op_id)
        else:
            history.ok(op_id, result, at=complete)
    return history


def test_an_acknowledged_write_overwritten_by_an_earlier_one_is_reported_lost() -> None:
    history = _history(("a", "put", "k", "old", 1, 2, None), ("b", "put", "k", "new", 3, 4, None))
    problems = lost_writes(history, {"k": "old"})
    assert len(problems) == 1 and "put 'new'" in problems[0]
    assert lost_writes(history, {"k": "new"}) == []


def test_an_unknown_write_may_end_up_last_but_a_value_nobody_wrote_may_not() -> None:
    history = _history(
        ("a", "put", "k", "maybe", 1, None, None), ("b", "put", "k", "sure", 3, 4, None)
    )
    assert lost_writes(history, {"k": "maybe"}) == []
    assert "no operation could have written" in lost_writes(history, {"k": "ghost"})[0]


def test_a_missing_key_needs_a_delete_after_the_last_acknowledged_write() -> None:
    written = _history(("a", "put", "k", "v", 1, 2, None))
    assert lost_writes(written, {"k": None})
    deleted = _history(("a", "put", "k", "v", 1, 2, None), ("b", "delete", "k", None, 3, 4, True))
    assert lost_writes(deleted, {"k": None}) == []
    assert lost_writes(deleted, {"k": "v"})


def test_a_cas_that_swapped_counts_as_a_write_and_one_that_did_not_does_not() -> None:
    history = _history(
        ("a", "put", "k", "v1", 1, 2, None),
        ("b", "cas", "k", "v2", 3, 4, (True, "v1")),
        ("c", "cas", "k", "v3", 5, 6, (False, "v2")),
    )
    assert lost_writes(history, {"k": "v2"}) == []
    assert lost_writes(history, {"k": "v1"})
    assert "no operation could have written" in lost_writes(history, {"k": "v3"})[0]


# -- the watch check on its own ----------------------------------------------------------------------


def _watcher(name: str, *runs: list[tuple[int, str, str, str | None]]) -> _Watcher:
    watcher = _Watcher(name, None)  # type: ignore[arg-type]
    watcher.runs = [[Change(*c) for c in run] for run in runs] or [[]]
    return watcher


_SEEN = [(3, "a", "put", "1"), (4, "b", "put", "2"), (6, "a", "delete", None), (7, "b", "put", "3")]
_PUTS = {3: ("a", "1"), 4: ("b", "2"), 7: ("b", "3")}
_FINAL = {"a": None, "b": "3"}


def test_watchers_that_were_each_sent_every_change_in_order_pass() -> None:
    watchers = [
        _watcher(LIBRARY, _SEEN),
        _watcher("node 1", _SEEN),
        # Its node compacted while it was away: a second run from later on, complete in itself.
        _watcher("node 2", _SEEN[:1], _SEEN[3:]),
    ]
    assert check_watchers(watchers, _PUTS, _FINAL) == []


@pytest.mark.parametrize(
    "seen, puts, final, complaint",
    [
        (
            _SEEN[:2] + _SEEN[3:],
            _PUTS,
            _FINAL,
            "node 1 missed 1 change(s) between revisions 3 and 7",
        ),
        (_SEEN[:2] + _SEEN[1:], _PUTS, _FINAL, "node 1 was sent a change twice"),
        (
            [_SEEN[1], _SEEN[0]] + _SEEN[2:],
            _PUTS,
            _FINAL,
            "was sent revision 3 ('a') after revision 4",
        ),
        (
            _SEEN[:3] + [(7, "b", "put", "9")],
            _PUTS,
            _FINAL,
            "revision 7 of 'b': node 1 was sent put '9'",
        ),
        (_SEEN, {**_PUTS, 5: ("a", "x")}, _FINAL, "acknowledged at revision 5 reached no watcher"),
        (_SEEN, _PUTS, {"a": "1", "b": "3"}, "leave 'a' at None; it holds '1'"),
    ],
    ids=["a gap", "a duplicate", "out of order", "disagreement", "acked put unseen", "final state"],
)
def test_each_broken_promise_of_watch_is_reported(
    seen: list[tuple[int, str, str, str | None]],
    puts: dict[int, tuple[str, str]],
    final: dict[str, str | None],
    complaint: str,
) -> None:
    problems = check_watchers([_watcher(LIBRARY, _SEEN), _watcher("node 1", seen)], puts, final)
    assert any(complaint in p for p in problems), problems


# -- the lease check on its own ----------------------------------------------------------------------


def _probe(kept_expiry: list[tuple[float, float]], abandoned_sent: float) -> LeaseProbe:
    """A probe with one kept lease (its reckoning sampled at these times) and one abandoned."""
    probe = LeaseProbe(None)  # type: ignore[arg-type]
    lease = KeptLease(7, PROBE_TTL)
    probe._kept.append(_Kept("lease-kept-0", lease, kept_expiry))
    probe._abandoned.append(_Abandoned("lease-abandoned-0", 8, abandoned_sent))
    return probe


def test_leases_that_kept_their_promises_pass() -> None:
    probe = _probe([(10.0, 14.0), (11.0, 15.0), (12.0, 15.0)], abandoned_sent=10.0)
    # The kept lease lost its keepalives at 15.0 and went at 15.4; the abandoned one after its TTL.
    summary, problems = probe.check({"lease-kept-0": 15.4, "lease-abandoned-0": 14.6})
    assert problems == []
    assert "expired 0.60 to 0.60 s after their TTL" in summary


@pytest.mark.parametrize(
    "deleted, complaint",
    [
        (
            {"lease-kept-0": 11.5, "lease-abandoned-0": 14.6},
            "deleted 3.50 s before its acknowledged",
        ),
        ({"lease-abandoned-0": 13.0}, "deleted 1.00 s before its TTL had passed"),
        ({}, "lease-abandoned-0 (lease 8, abandoned) was never deleted"),
    ],
    ids=["kept lease expired early", "abandoned lease expired early", "abandoned lease never"],
)
def test_each_broken_promise_of_a_lease_is_reported(
    deleted: dict[str, float], complaint: str
) -> None:
    probe = _probe([(10.0, 14.0), (11.0, 15.0)], abandoned_sent=10.0)
    _, problems = probe.check(deleted)
    assert any(complaint in p for p in problems), problems


def test_a_saved_history_reads_back_the_same(tmp_path: Path) -> None:
    history = _history(
        ("a", "put", "k", "v1", 1, 2, None),
        ("b", "cas", "k", "v2", 3, 4, (True, "v1")),
        (FINAL_CLIENT, "get", "k", None, 5, 6, "v2"),
        ("c", "delete", "k", None, 7, None, None),
    )
    options = SuiteOptions(history_dir=tmp_path)
    result = SuiteResult(options, history, CheckResult(ok=True), [], [], "")
    again = load_history(save_history(result))
    assert again.operations == history.operations


# -- real processes ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_a_minute_of_mixed_faults_keeps_every_operation_linearizable(tmp_path: Path) -> None:
    result = await run_suite(
        SuiteOptions(
            duration=60,
            seed=SEED,
            timing=CI_TIMING,
            history_dir=tmp_path,
            work_dir=tmp_path / "run",
            say=lambda text: print(text, flush=True),
        )
    )
    print(result.report)
    assert result.check.ok, f"not linearizable, {_explain(result)}"
    assert not result.lost_writes, f"acknowledged writes lost, {_explain(result)}"
    assert not result.diverged, f"nodes did not catch up, {_explain(result)}"
    injected = {fault.kind for fault in result.faults}
    assert injected == set(FAULT_KINDS), f"faults missing: {set(FAULT_KINDS) - injected}"
    ops = [op for op in result.history.operations if op.client != FINAL_CLIENT]
    ok = Counter(op.kind for op in ops if op.outcome == "ok")
    assert all(ok[kind] > 0 for kind in ("get", "put", "cas", "delete")), ok
    assert len({op.client for op in ops}) >= 10


@pytest.mark.slow
async def test_faults_under_mutual_tls_with_a_ca_of_the_peers_own_keep_the_history_linearizable(
    tmp_path: Path,
) -> None:
    """Every peer connection checks a certificate naming its member, from a CA that signs no
    client's; kills and partitions reconnect through it (the nodes run as in production)."""
    said: list[str] = []
    result = await run_suite(
        SuiteOptions(
            duration=30,
            seed=SEED,
            timing=CI_TIMING,
            tls=True,
            history_dir=tmp_path,
            work_dir=tmp_path / "run",
            say=said.append,
        )
    )
    print("\n".join(said), result.report, sep="\n")
    assert any(line.startswith("TLS:") for line in said), said
    assert result.ok, _explain(result)
    assert len(result.faults) >= 3, _explain(result)
    ok = Counter(op.kind for op in result.history.operations if op.outcome == "ok")
    assert all(ok[kind] > 0 for kind in ("get", "put", "cas", "delete")), ok


@pytest.mark.slow
async def test_stale_reads_from_an_isolated_leader_are_reported_not_linearizable(
    tmp_path: Path,
) -> None:
    result = await run_suite(
        SuiteOptions(
            duration=12,
            seed=SEED,
            faults=["isolate-leader"],
            stale_reads=True,
            overlap=0.0,
            timing=NemesisTiming(partition=(5.0, 6.0), quiet=(1.0, 1.5)),
            history_dir=tmp_path,
            work_dir=tmp_path / "run",
        )
    )
    print(result.report)
    assert result.stale_reads > 0, "no read was aimed at an isolated leader"
    assert not result.check.ok and not result.check.inconclusive, _explain(result)
    assert result.check.window, "a violation comes with its failing window"
    assert result.history_file is not None and result.history_file.exists()
    assert "not linearizable" in result.report


def test_lock_sections_that_overlap_or_whose_tokens_fall_are_reported() -> None:
    fine = [Section(1, 10, 5, 0.0, 1.0, False), Section(2, 14, 6, 1.0, 2.0, True)]
    assert check_sections(fine) == []
    overlapping = [Section(1, 10, 5, 0.0, 1.0, False), Section(2, 14, 6, 0.9, 2.0, False)]
    (problem,) = check_sections(overlapping)
    assert "overlap" in problem
    falling = [Section(1, 10, 5, 0.0, 1.0, False), Section(2, 9, 6, 1.5, 2.0, False)]
    (problem,) = check_sections(falling)
    assert "no higher token" in problem
    late = [Section(1, 10, 5, 1.0, 0.5, True)]
    assert check_sections(late) == [
        "client 1's section with token 10 (1.000-0.500 s) ended before it started"
    ]


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_lock_holders_under_faults_are_never_inside_at_once(tmp_path: Path) -> None:
    """Clients taking one lock in turn while leaders die, nodes pause and the network splits: every
    critical section (cut where its holder's own lease reckoning ends) disjoint from every other,
    fencing tokens rising (test/lock_workload.py states the check)."""
    result = await run_suite(
        SuiteOptions(
            duration=30,
            seed=SEED,
            clients=3,
            locks=4,
            faults=["kill-leader", "pause", "isolate-leader", "partition"],
            timing=CI_TIMING,
            history_dir=tmp_path,
            work_dir=tmp_path / "run",
            say=lambda text: print(text, flush=True),
        )
    )
    print(result.report)
    assert result.locks is not None
    assert not result.lock_problems, _explain(result)
    assert result.ok, _explain(result)
    # Enough turns, and enough of them across faults, for the check to mean something.
    assert len(result.locks.sections) >= 10, _explain(result)
    assert len({s.client for s in result.locks.sections}) >= 2


@pytest.mark.slow
async def test_partitions_through_per_link_proxies_keep_the_history_linearizable() -> None:
    """The fallback where namespaces are not available: nodes on loopback behind proxies."""
    result = await run_suite(
        SuiteOptions(
            duration=15,
            seed=SEED,
            network="proxies",
            faults=["isolate-leader", "one-way", "partition"],
            timing=CI_TIMING,
        )
    )
    print(result.report)
    assert result.ok, _explain(result)
    assert "proxy" in result.network


def test_a_bad_duration_is_one_line_and_exit_code_2() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "test.test_harness", "faults", "--duration", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "--duration" in run.stderr


@pytest.mark.slow
def test_sigterm_removes_every_node_namespace_and_interface(tmp_path: Path) -> None:
    """The harness is ended mid-run: it must leave no node process and nothing in the network."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "test.test_harness",
            "faults",
            "--duration",
            "120",
            "--data-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            # Once a fault is under way, every kind of resource exists.
            if "nemesis:" in line:
                break
        else:
            pytest.fail("the suite ended before injecting a fault:\n" + "".join(seen))
        assert _processes_mentioning(str(tmp_path)), "no node process found to be cleaned up"
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, "".join(seen) + rest
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_mentioning(str(tmp_path)) == []
    if namespaces_available():
        assert _own_names(proc.pid) == []


@pytest.mark.skipif(not namespaces_available(), reason="needs root and `ip netns`")
def test_a_new_run_removes_what_a_crashed_run_left_behind() -> None:
    """A namespace named for a process that is gone is deleted, with the node still inside it."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    name = f"{NAME_PREFIX}{gone.pid & 0xFFFFFF:06x}0n0"
    subprocess.run(["ip", "netns", "add", name], check=True)
    left = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while not subprocess.run(["ip", "netns", "pids", name], capture_output=True).stdout:
            assert time.monotonic() < deadline, "the process never entered the namespace"
            time.sleep(0.05)
        assert name in sweep_stale()
        assert _own_names(gone.pid) == []
        assert left.wait(timeout=10) == -signal.SIGKILL
    finally:
        if left.poll() is None:
            left.kill()
            left.wait()
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
