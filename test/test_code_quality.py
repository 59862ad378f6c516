"""The house checks: black formatting, ruff lint and mypy types on the project's own modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "command",
    [
        # black and mypy take several seconds each: the fast loop (-m "not slow") leaves them out.
        pytest.param(["black", "--check", "--quiet", "."], marks=pytest.mark.slow, id="black"),
        pytest.param(["ruff", "check", "--quiet", "."], id="ruff"),
        pytest.param(["mypy", "."], marks=pytest.mark.slow, id="mypy"),
    ],
)
def test_house_checks_pass(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}"
