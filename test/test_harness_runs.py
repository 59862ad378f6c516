"""The README's main job, `python -m test.test_harness`, runs every scenario green on real processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("basic", "leader-dies", "full-restart", "follower-catch-up")


def harness(*args: str) -> str:
    """Run the harness on free ports (so a cluster someone left on 12345 does not collide with CI);
    its output, once it exited 0."""
    result = subprocess.run(
        [sys.executable, "-m", "test.test_harness", "--first-port", "0", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_harness_passes_every_scenario() -> None:
    output = harness()
    for name in SCENARIOS:
        assert f"PASS {name}" in output, output
    assert "4 of 4 scenarios passed" in output, output


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_harness_passes_every_scenario_under_mutual_tls_with_a_peer_ca() -> None:
    output = harness("--tls", "--peer-ca")
    assert "TLS: certificates in" in output, output
    assert "4 of 4 scenarios passed" in output, output
