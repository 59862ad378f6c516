"""The live view as a person uses it: `python -m test.test_harness up --web` in a real process, its
page in headless Chromium (Debian's chromium and chromedriver, driven by selenium), and the page's
own buttons. `python -m test.test_live_view --screenshot FILE` takes the README's picture the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from test.cluster_process import REPO_ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# The flags this machine's headless Chromium needs: no sandbox as root, and no background
# connections (the network is closed; they would be refused, many at a time).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
STARTUP_TIMEOUT = 60.0
# Generous: two cores are shared with whatever else runs.
LEADER_TIMEOUT = 30.0
COMMIT_TIMEOUT = 30.0
CATCH_UP_TIMEOUT = 45.0

T = TypeVar("T")


class Harness:
    """`python -m test.test_harness up --web 0` in its own process group, its output in a file."""

    def __init__(self, work: Path, extra: list[str] | None = None) -> None:
        self.output_path = work / "harness.out"
        self._output = open(self.output_path, "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "test.test_harness",
                "--data-dir",
                str(work / "data"),
                *(extra or []),
                "up",
                "--web",
                "0",
            ],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            process_group=0,
        )

    def output(self) -> str:
        return self.output_path.read_text(encoding="utf-8", errors="replace")

    def url(self) -> str:
        def found() -> str | None:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the harness exited with code {self.proc.returncode}:\n{self.output()}"
                )
            match = re.search(r"live view: (http://\S+)", self.output())
            return match.group(1) if match else None

        return wait_for(found, STARTUP_TIMEOUT, lambda: f"no URL printed:\n{self.output()}")

    def stop(self) -> None:
        """SIGTERM (the harness then stops every node it started); if it hangs, SIGKILL it and
        the nodes it printed (each in a process group of its own)."""
        forced = False
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                forced = True
        for pid in re.findall(r"pid (\d+)", self.output()) if forced else []:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(pid), signal.SIGKILL)
        self._output.close()


def wait_for(condition: Callable[[], T | None], timeout: float, what: Callable[[], str]) -> T:
    """Poll `condition` until it returns something other than None/False, or fail saying `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"after {timeout:g} s: {what()}")
        time.sleep(0.2)


@contextlib.contextmanager
def browser(width: int = 1500, height: int = 1000) -> Iterator[Any]:
    """Headless Chromium under chromedriver, quit (and its profile removed) on every exit path."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: the live view's browser test needs Debian's "
            "chromium and chromium-driver (`apt-get install -y chromium chromium-driver`; "
            ".ci/run installs them)",
            pytrace=False,
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="raft-demo-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        options.add_argument(f"--window-size={width},{height}")
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
        try:
            yield driver
        finally:
            driver.quit()


# -- reading the page ------------------------------------------------------------------------------

_CARDS = """
return [...document.querySelectorAll('.node')].map(c => ({
  id: Number(c.dataset.nodeId), role: c.dataset.role, state: c.dataset.state,
  term: Number(c.dataset.term || -1), last: Number(c.dataset.lastIndex || -1),
  commit: Number(c.dataset.commit || -1),
  committedCells: [...c.querySelectorAll('.log .cell.committed')].map(e => Number(e.dataset.index)),
}));
"""


def cards(driver: Any) -> dict[int, dict[str, Any]]:
    """Each node card on the page as it reads now: id, role, state, term, indexes, log cells."""
    return {c["id"]: c for c in driver.execute_script(_CARDS) if c["id"]}


def leaders(driver: Any) -> list[dict[str, Any]]:
    return [c for c in cards(driver).values() if c["role"] == "leader" and c["state"] == "up"]


def describe(driver: Any) -> str:
    return "; ".join(
        f"{i}: {c['state']} {c['role']} t={c['term']} last={c['last']} commit={c['commit']}"
        for i, c in sorted(cards(driver).items())
    )


def click(driver: Any, action: str, node: int | None = None) -> None:
    where = f'.node[data-node-id="{node}"] ' if node is not None else "#client "
    driver.find_element("css selector", f'{where}button[data-action="{action}"]').click()


def last_request(driver: Any) -> str:
    items = driver.find_elements("css selector", "#requests li")
    return str(items[0].text) if items else ""


def one_leader(driver: Any, nodes: int) -> dict[str, Any] | None:
    now = cards(driver)
    up = [c for c in now.values() if c["state"] == "up"]
    found = leaders(driver)
    if len(now) == nodes and len(up) == nodes and len(found) == 1:
        return found[0]
    return None


# -- the test --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_live_view_shows_failover_writes_and_catch_up(tmp_path: Path) -> None:
    """Five nodes and one leader on the page; kill -9 the leader from the page: a new leader in a
    higher term, the old one shown down; a put from the page lands committed in every live
    node's log row; restarted from the page, the old leader catches up."""
    harness = Harness(tmp_path)
    try:
        url = harness.url()
        with browser() as driver:
            driver.get(url)
            first = wait_for(
                lambda: one_leader(driver, 5),
                LEADER_TIMEOUT,
                lambda: f"the page never showed five nodes up and one leader: {describe(driver)}",
            )
            old, term = first["id"], first["term"]

            click(driver, "kill", old)
            new = wait_for(
                lambda: next(
                    (c for c in leaders(driver) if c["id"] != old and c["term"] > term), None
                ),
                LEADER_TIMEOUT,
                lambda: f"no new leader after killing node {old} in term {term}: "
                + describe(driver),
            )
            wait_for(
                lambda: cards(driver)[old]["state"] == "down",
                10,
                lambda: f"node {old} not shown down: {describe(driver)}",
            )

            key = driver.find_element("id", "key")
            key.clear()
            key.send_keys("from-the-page")
            click(driver, "put")
            wait_for(
                lambda: "✔ put from-the-page" in last_request(driver),
                COMMIT_TIMEOUT,
                lambda: f"the put was not acknowledged: {last_request(driver)!r}",
            )
            # The put's entry is at most the leader's last index once it was acknowledged.
            index = cards(driver)[new["id"]]["last"]
            live = [i for i in cards(driver) if i != old]

            def committed_everywhere() -> bool:
                now = cards(driver)
                return all(index in now[i]["committedCells"] for i in live)

            wait_for(
                committed_everywhere,
                COMMIT_TIMEOUT,
                lambda: f"entry {index} not committed in every live row: {describe(driver)}",
            )

            click(driver, "restart", old)

            def caught_up() -> bool:
                now = cards(driver)
                return now[old]["state"] == "up" and index in now[old]["committedCells"]

            wait_for(
                caught_up,
                CATCH_UP_TIMEOUT,
                lambda: f"node {old} did not catch up to entry {index}: {describe(driver)}",
            )
    except BaseException:
        print(harness.output()[-4000:])
        raise
    finally:
        harness.stop()


# -- the README's screenshot -----------------------------------------------------------------------


def take_screenshot(path: Path) -> None:
    """Start the harness's view; from the page, write keys, kill the leader, write again and kill
    a follower; then save the page as it stands."""

    def put(driver: Any, key: str) -> None:
        field = driver.find_element("id", "key")
        field.clear()
        field.send_keys(key)
        click(driver, "put")
        wait_for(lambda: f"✔ put {key}=" in last_request(driver), 30, lambda: f"no put {key}")

    with tempfile.TemporaryDirectory(prefix="raft-demo-screenshot-") as work:
        harness = Harness(Path(work))
        try:
            with browser(1500, 1120) as driver:
                driver.get(harness.url())
                first = wait_for(lambda: one_leader(driver, 5), LEADER_TIMEOUT, lambda: "no leader")
                for key in ("color", "size", "shape"):
                    put(driver, key)
                click(driver, "kill", first["id"])
                second = wait_for(
                    lambda: next((c for c in leaders(driver) if c["id"] != first["id"]), None),
                    LEADER_TIMEOUT,
                    lambda: "no new leader",
                )
                for key in ("weight", "height"):
                    put(driver, key)
                victim = next(i for i in cards(driver) if i not in (first["id"], second["id"]))
                click(driver, "pause", victim)
                put(driver, "depth")
                time.sleep(1.0)
                path.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(path))
        finally:
            harness.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m test.test_live_view")
    parser.add_argument("--screenshot", type=Path, required=True, metavar="FILE")
    take_screenshot(parser.parse_args().screenshot)


@pytest.mark.parametrize(
    ("method", "origin", "content_type", "status"),
    [
        ("GET", None, None, 200),  # curl, a script: no Origin
        ("GET", "http://127.0.0.1:8080", None, 200),  # the view's own page
        ("GET", "http://evil.example", None, 403),  # another site's page opening the WebSocket
        ("POST", "http://127.0.0.1:8080", "application/json", 200),
        ("POST", "http://evil.example", "application/json", 403),
        ("POST", "http://127.0.0.1:8080", "text/plain", 415),  # what a cross-site form can send
        ("POST", None, "application/x-www-form-urlencoded", 415),
    ],
)
async def test_only_the_views_own_page_may_read_events_or_press_buttons(
    method: str, origin: str | None, content_type: str | None, status: int
) -> None:
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from web_view import same_origin_only

    headers = {"Host": "127.0.0.1:8080"}
    if origin is not None:
        headers["Origin"] = origin
    if content_type is not None:
        headers["Content-Type"] = content_type
    request = make_mocked_request(method, "/api/kill" if method == "POST" else "/events", headers)

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(text="done")

    response = await same_origin_only(request, handler)
    assert response.status == status
