"""The benchmark's quickest run against this project and the do-nothing server produces a readable
table, well-formed JSON and PNG charts; a missing system is skipped with how to install it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test.bench_report import Cell, markdown_table, node_costs, percentile
from test.bench_systems import NodeSample, cpu_seconds, rss_bytes

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_benchmark(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "test.benchmark", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.fixture(scope="module")
def quick_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("bench")
    result = run_benchmark("--quick", "--clients", "1,4", "--duration", "1", "--out", str(out))
    return result, out


@pytest.mark.slow
def test_quick_run_writes_json_with_a_measured_cell_per_system_workload_and_concurrency(
    quick_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    result, out = quick_run
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "results.json").read_text())
    cells = {(c["system"], c["workload"], c["clients"]): c for c in report["cells"]}
    expected = {(s, w, n) for s in ("raft-demo", "null") for w in ("write", "read") for n in (1, 4)}
    assert set(cells) == expected
    for key, cell in cells.items():
        assert cell["note"] == "", key
        assert cell["ops"] > 0 and cell["errors"] == 0, key
        assert cell["nodes"] == 3 and cell["value_size"] == 64, key
        assert 0 < cell["p50_ms"] <= cell["p99_ms"] <= cell["p999_ms"], key
        # The CPU figure is read from the node processes, so it is there and positive.
        assert cell["cpu_s_per_1000_ops"] is not None and cell["cpu_s_per_1000_ops"] > 0, key
    assert report["machine"] and report["command"].startswith("python -m test.benchmark")
    # What each process spent: the leader first, then the followers, with the node's counters.
    for (system, workload, clients), cell in cells.items():
        rows = cell["node_costs"]
        assert len(rows) == (3 if system == "raft-demo" else 1), (system, workload, clients)
        assert all(r["cpu_ms_per_op"] > 0 and r["loop_busy_percent"] > 0 for r in rows)
        if system == "raft-demo":
            assert [r["role"] for r in rows] == ["leader", "follower", "follower"]
            assert all(r["msgs_sent_per"] > 0 and r["msgs_received_per"] > 0 for r in rows)
        if system == "raft-demo" and workload == "write":
            leader = rows[0]
            assert leader["per"] == "entry" and leader["committed_entries"] >= cell["ops"]
            assert leader["entries_per_append_mean"] >= 1 and leader["entries_per_append_p99"] >= 1
            assert all(0 < r["fsyncs_per"] for r in rows)
            assert 0 < leader["write_ms_in_node"] < cell["p99_ms"]


@pytest.mark.slow
def test_quick_run_prints_the_table_and_draws_one_png_per_workload(
    quick_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    result, out = quick_run
    assert "ops/s" in result.stdout and "cpu s/1k ops" in result.stdout
    table_rows = [
        line
        for line in result.stdout.splitlines()
        if line.split()[:2] in (["raft-demo", "write"], ["null", "read"])
    ]
    assert len(table_rows) >= 4  # two client counts each, as measured and in the final table
    charts = sorted(p.name for p in out.glob("*.png"))
    assert charts == ["read-3nodes-64B.png", "write-3nodes-64B.png"]
    for name in charts:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    printed = [
        line.split(":")[0].split() for line in result.stdout.splitlines() if "CPU/op" in line
    ]
    assert [p[0] for p in printed].count("leader") == 4  # under each raft-demo cell
    assert [p[0] for p in printed].count("follower") == 8
    assert "msgs/entry sent" in result.stdout and "entries/append mean" in result.stdout
    assert "fsyncs/entry" in result.stdout and "loop busy" in result.stdout
    markdown = (out / "results.md").read_text()
    headline, full, per_process = markdown.split("\n\n")
    assert headline.startswith("| system (3 nodes, 64 B) |")
    assert [row.split(" | ")[0] for row in headline.splitlines()[2:]] == ["| raft-demo", "| null"]
    assert full.startswith("| system |") and len(full.splitlines()) == 2 + 8
    # One row per process of each cell: three nodes for raft-demo's four cells, one for null's.
    assert per_process.startswith("| system |") and len(per_process.splitlines()) == 2 + 4 * 3 + 4


@pytest.mark.slow
def test_a_saved_run_is_drawn_again_without_measuring(
    quick_run: tuple[subprocess.CompletedProcess[str], Path], tmp_path: Path
) -> None:
    _, out = quick_run
    result = run_benchmark("--from-json", str(out / "results.json"), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(
        p.name for p in out.glob("*.png")
    )
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(
        (out / "results.json").read_text()
    )


@pytest.mark.slow
def test_a_system_that_is_not_installed_is_skipped_with_how_to_install_it(
    tmp_path: Path,
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    env = dict(os.environ, PATH=str(empty))
    result = run_benchmark(
        "--systems", "etcd,null", "--workloads", "write", "--clients", "1", "--value-sizes", "64",
        "--nodes", "1", "--duration", "0.3", "--no-charts", "--out", str(tmp_path / "out"), env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "skipping etcd: etcd is not installed: apt-get install etcd-server" in result.stdout
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "etcd" in report["skipped"]
    assert {c["system"] for c in report["cells"]} == {"null"}


def test_a_bad_flag_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_benchmark("--clients", "0", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "expected positive numbers" in result.stderr
    assert "Traceback" not in result.stderr


def test_process_figures_come_from_proc() -> None:
    me = os.getpid()
    assert cpu_seconds(me) > 0 and rss_bytes(me) > 0
    # Above the kernel's largest pid: a process that is gone reads as nothing used, not an error.
    assert cpu_seconds(2**22 + 1) == 0.0 and rss_bytes(2**22 + 1) == 0


def test_percentiles_and_markdown_rows() -> None:
    values = [float(v) for v in range(1, 1001)]
    assert percentile(values, 0.5) == 500 and percentile(values, 0.999) == 999
    assert percentile([], 0.5) == 0
    cell = Cell("etcd", "write", 5, 64, 64, ops=10, ops_per_s=1234.4, cpu_s_per_1000_ops=0.5)
    skipped = Cell("pysyncobj", "-", 5, 0, 0, note="could not be measured")
    rows = markdown_table([cell, skipped]).splitlines()
    assert len(rows) == 3 and rows[2].startswith("| etcd | write | 5 | 64 | 64 | 1,234 |")


def test_node_costs_count_per_committed_entry_as_the_leader_counts_them() -> None:
    """Messages and fsyncs are per entry the leader committed during the cell (a follower still
    learning of an earlier commit does not count), per operation when nothing committed; the p99
    of entries per AppendEntries comes from the leader's counts by size."""
    leader = 'raft_demo_role{role="leader"}'
    sizes = 'raft_demo_append_messages_by_entries_total{entries="%d"}'

    def sample(name: str, cpu: float, **metrics: float) -> NodeSample:
        return NodeSample(
            name, cpu, cpu / 2, 0.0, {f"raft_demo_{k}": v for k, v in metrics.items()}
        )

    before = [
        sample("1", 1.0, commit_index=10, raft_messages_sent_total=0, log_fsyncs_total=0),
        sample("2", 1.0, commit_index=9, raft_messages_sent_total=0, log_fsyncs_total=0),
    ]
    before[0].metrics[leader] = 1.0
    before[0].metrics[sizes % 1] = 5
    after = [
        sample("2", 1.5, commit_index=110, raft_messages_sent_total=50, log_fsyncs_total=50),
        sample("1", 3.0, commit_index=110, raft_messages_sent_total=200, log_fsyncs_total=20),
    ]
    after[1].metrics[leader] = 1.0
    after[1].metrics[sizes % 1] = 5 + 99
    after[1].metrics[sizes % 4] = 1
    rows = node_costs(before, after, ops=100, wall=2.0)
    assert [(r["node"], r["role"]) for r in rows] == [("1", "leader"), ("2", "follower")]
    assert rows[0]["cpu_ms_per_op"] == 20.0 and rows[0]["loop_busy_percent"] == 50.0
    assert (rows[0]["per"], rows[0]["msgs_sent_per"], rows[0]["fsyncs_per"]) == ("entry", 2.0, 0.2)
    assert rows[1]["msgs_sent_per"] == 0.5  # 100 committed, not the follower's 101
    assert rows[0]["entries_per_append_mean"] == round(103 / 100, 2)
    assert rows[0]["entries_per_append_p99"] == 1
    after[1].metrics["raft_demo_commit_index"] = 10  # nothing committed: per operation
    assert node_costs(before, after, ops=100, wall=2.0)[0]["per"] == "op"
