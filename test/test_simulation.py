"""The deterministic simulation (test/simulation.py), tested: a seed replays exactly, a fixed range of
seeds holds every invariant under faults and membership changes of every kind, and each deliberately
broken variant of the node is caught within that range and replays from its seed.

The range is seeds 0-499; `RAFT_DEMO_SIM_SEEDS=A-B` sets another (a shorter one is a quicker and
weaker check: a variant may then go uncaught, and the test says so)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test import sim_world
from test.sim_faults import FAULT_KINDS, MEMBERSHIP_KINDS
from test.simulation import DEFAULT_OPS, run_seed, soak, summarize

REPO = Path(__file__).resolve().parent.parent
SEEDS_VARIABLE = "RAFT_DEMO_SIM_SEEDS"


def _ci_seeds(default: range = range(0, 500)) -> range:
    """The seeds to run: `default`, or the range A-B (or the one seed A) in RAFT_DEMO_SIM_SEEDS."""
    text = os.environ.get(SEEDS_VARIABLE, "").strip()
    if not text:
        return default
    first, sep, last = text.partition("-")
    try:
        low = int(first)
        high = int(last) if sep else low
    except ValueError:
        low, high = -1, -1
    if low < 0 or high < low:
        raise ValueError(f"{SEEDS_VARIABLE}={text!r} is not a seed range like 0-499")
    return range(low, high + 1)


# The CI budget: these seeds of a five-node cluster, run in two worker processes; the three-node
# runs take the first hundred of them.
CI_SEEDS = _ci_seeds()
THREE_NODE_SEEDS = CI_SEEDS[:100]
JOBS = 2
# A seed takes about half a second with two workers on an idle 2-core machine: a soak gets eight
# times that before it fails as hung (pytest-timeout), and never less than half an hour.
SOAK_TIMEOUT = max(1800, 4 * len(CI_SEEDS))
# Each broken variant of the node, and the checks that may catch it.
_LOST_COMMITS = {
    "commit safety",
    "leader completeness",
    "state machine safety",
    "no acknowledged write lost",
    "no errors logged by the nodes",
}
CATCHES = {
    "forget-vote": {"election safety"},
    "commit-earlier-term": _LOST_COMMITS,
    "ack-before-fsync": _LOST_COMMITS,
    "overwrite-without-truncate": {
        "log matching",
        "well-formed messages",
        "state machine safety",
        "no errors logged by the nodes",
    },
    "stale-read": {"linearizability"},
    "no-pre-vote": {"no disruptive elections"},
    "no-check-quorum": {"check quorum"},
    "compact-past-snapshot": _LOST_COMMITS
    | {"no unexpected errors", "crash recovery", "convergence", "liveness"},
    "two-changes-at-once": {"one change at a time"},
    "removed-leader-counts-itself": _LOST_COMMITS | {"check quorum"},
}


def test_a_seed_replays_to_the_same_trace_in_this_process_and_in_another() -> None:
    first = run_seed(3)
    again = run_seed(3)
    assert first.ok and again.ok, first.report or again.report
    assert first.events == again.events
    assert first.trace_hash == again.trace_hash
    # The hash covers the run: another seed gives another trace.
    assert run_seed(4).trace_hash != first.trace_hash
    # A fresh interpreter with another string-hash seed (the replay command's situation).
    env = dict(os.environ, PYTHONHASHSEED="4242")
    done = subprocess.run(
        [sys.executable, "-m", "test.simulation", "--seed", "3"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"trace {first.trace_hash[:16]}" in done.stdout, done.stdout


@pytest.mark.slow
@pytest.mark.timeout(SOAK_TIMEOUT)
def test_every_invariant_holds_over_the_ci_seed_range(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.perf_counter()
    results = soak(CI_SEEDS, jobs=JOBS)
    summary = summarize(results, time.perf_counter() - started, JOBS)
    with capsys.disabled():
        print(f"\nsimulation of seeds {CI_SEEDS.start}-{CI_SEEDS.stop - 1}:\n{summary}")
    failed = [r for r in results if not r.ok]
    assert not failed, "\n\n".join(r.report for r in failed[:3])
    assert [r.seed for r in results] == list(CI_SEEDS)
    changing = 0
    for r in results:
        assert r.outcomes["ok"] >= DEFAULT_OPS, f"seed {r.seed}: only {r.outcomes}"
        missing = [kind for kind in FAULT_KINDS if not r.faults.get(kind)]
        assert not missing, f"seed {r.seed} injected no {', '.join(missing)}"
        assert r.membership is not None
        if not r.membership["changing"]:
            continue
        changing += 1
        missing = [kind for kind in MEMBERSHIP_KINDS if not r.membership.get(kind)]
        assert not missing, f"seed {r.seed} made no {', '.join(missing)}"
        # Never fewer than three voters, never more than seven.
        assert 3 <= r.membership["fewest voters"] <= r.membership["most voters"] <= 7, r.membership
    # Most runs change their membership (the others are the runs they were before).
    assert changing >= len(results) / 2, f"only {changing} runs changed their membership"


@pytest.mark.slow
@pytest.mark.timeout(SOAK_TIMEOUT)
def test_a_three_node_cluster_holds_every_invariant_as_it_grows_and_shrinks() -> None:
    results = soak(THREE_NODE_SEEDS, nodes=3, jobs=JOBS)
    failed = [r for r in results if not r.ok]
    assert not failed, "\n\n".join(r.report for r in failed[:3])
    assert all(r.nodes == 3 and r.outcomes["ok"] >= DEFAULT_OPS for r in results)
    # One that changes its membership cannot lose a voter before it has gained one.
    changing = [r for r in results if r.membership and r.membership["changing"]]
    assert len(changing) >= len(results) / 2
    assert all(r.membership and r.membership["most voters"] > 3 for r in changing)


@pytest.mark.slow
@pytest.mark.timeout(SOAK_TIMEOUT)
@pytest.mark.parametrize("variant", list(CATCHES))
def test_a_broken_node_is_caught_within_the_ci_seed_range_and_replays(
    variant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    results = soak(CI_SEEDS, jobs=JOBS, variant=variant, stop_at_first_failure=True)
    caught = next((r for r in results if not r.ok), None)
    assert caught is not None, f"{variant} passed all {len(results)} seeds"
    with capsys.disabled():
        print(f"\n{variant}: caught by seed {caught.seed} ({caught.invariant})")
    assert caught.invariant in CATCHES[variant], caught.report
    # The report a person acts on: seed, invariant, recent events, and the command to replay it.
    report = caught.report
    assert f"seed {caught.seed}: {caught.invariant} broken" in report
    assert "events before it (up to t=" in report
    replay = f"python -m test.simulation --seed {caught.seed} --verbose --variant {variant}"
    assert report.endswith(f"replay: {replay}")
    if caught.invariant == "linearizability":
        assert "smallest failing window" in report
    # The same seed replays to the same failure; the node as it is passes it.
    again = run_seed(caught.seed, variant=variant)
    assert (again.invariant, again.trace_hash) == (caught.invariant, caught.trace_hash)
    assert run_seed(caught.seed).ok


@pytest.mark.slow
@pytest.mark.timeout(SOAK_TIMEOUT)
def test_the_replay_command_narrates_the_run_and_reports_the_failure() -> None:
    results = soak(CI_SEEDS, jobs=JOBS, variant="stale-read", stop_at_first_failure=True)
    caught = next(r for r in results if not r.ok)
    command = caught.report.rsplit("replay: ", 1)[1]
    done = subprocess.run(
        [sys.executable, *command.split()[1:]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    # The nodes' own narration, at simulated times, among network, fault and client events.
    assert any(" node   [" in line and "won the election" in line for line in lines)
    assert any(" client c" in line for line in lines)
    assert any(" fault  " in line for line in lines)
    assert any(" net    " in line for line in lines)
    assert f"SIMULATION FAILURE: seed {caught.seed}: linearizability broken" in done.stdout
    assert f"trace {caught.trace_hash[:16]}" in done.stdout


def test_the_command_line_refuses_bad_arguments_in_one_line() -> None:
    for args in (["--seeds", "9-3"], ["--seed", "1", "--nodes", "2"], ["--variant", "nope"], []):
        done = subprocess.run(
            [sys.executable, "-m", "test.simulation", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, args
        assert "Traceback" not in done.stderr
        assert done.stderr.strip().count("\n") <= 1, done.stderr


# Regression: RaftNode._replicate once tested `now - last_sent >= heartbeat_interval` but armed its
# timer for `last_sent + heartbeat_interval`; a timer firing exactly on time could then look early
# and re-arm for the same instant forever. Seed 2 with zero timer latency (and, as when it was
# found, no membership changes) hit it.
def test_a_leader_does_not_spin_when_its_heartbeat_timer_fires_exactly_on_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sim_world, "TIMER_LATENCY", 0.0)
    result = run_seed(2, membership=False)
    assert result.ok, result.report


# Seeds that found bugs in the node, kept so that they stay fixed (without membership changes, the
# runs are the ones that found them). These found RaftLog truncating and appending with one fsync
# at the end: a crash could keep the old suffix behind a new record written over it (entries out
# of term order, or a log that does not reopen).
@pytest.mark.parametrize("seed", [2332, 4065, 4219, 7099, 9699])
def test_a_crash_while_a_follower_replaces_conflicting_entries_leaves_a_sound_log(
    seed: int,
) -> None:
    result = run_seed(seed, membership=False)
    assert result.ok, result.report


def test_leases_expire_neither_early_nor_late_through_the_faults() -> None:
    """A lease client (test/sim_leases.py) beside the others: no lease expires before its TTL since
    the send of its last acknowledged keepalive, across leader changes, partitions and crashes;
    once quiet, every abandoned lease goes within its TTL and a tick of a stable leader."""
    for seed in range(4):
        result = run_seed(seed, leases=True)
        assert result.ok, result.report


@pytest.mark.slow
def test_leases_hold_their_bounds_over_more_seeds() -> None:
    failed = [r for r in (run_seed(seed, leases=True) for seed in range(4, 40)) if not r.ok]
    assert not failed, "\n\n".join(r.report for r in failed[:2])
