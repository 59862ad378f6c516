"""The README's main job, `python -m test.test_harness`, runs every scenario green on real processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("basic", "leader-dies", "full-restart", "follower-catch-up")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_harness_passes_every_scenario() -> None:
    # --first-port 0: free ports, so a cluster someone left on 12345 does not collide with CI.
    result = subprocess.run(
        [sys.executable, "-m", "test.test_harness", "--first-port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for name in SCENARIOS:
        assert f"PASS {name}" in output, output
    assert "4 of 4 scenarios passed" in output, output
