"""The controller's dashboard, rendered by headless Chromium (Debian's chromium package) with live data.

The screenshot goes to `.artifacts/dashboard.png` at the repository root (or $KVTIER_ARTIFACTS).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster.procs import ROOT, Controller, Instance, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI sets REQUIRE_TEST_SERVERS=1: there a missing chromium fails the test instead of skipping it
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("REQUIRE_TEST_SERVERS"), reason="needs chromium (apt-get install chromium)"
)
DOC = list(range(3000, 3040))  # 10 chunks of 4


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    argv = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--hide-scrollbars", "--virtual-time-budget=4000", *args]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)


def test_dashboard_renders_live_data(tmp_path):
    controller = Controller(missed_beats=10)
    insts = [Instance(name, controller, "1MiB", tmp_path / name if name == "a" else None) for name in "abc"]
    a, b, c = insts
    try:
        a.call("store", tokens=DOC[:20])
        time.sleep(0.5)  # a heartbeat before the lookups: the hit rate is measured between heartbeats
        assert a.call("lookup", tokens=DOC)["tokens"] == 20  # 50% of the tokens hit
        assert b.call("lookup", tokens=DOC)["tokens"] == 0
        c.kill9()
        wait_for(lambda: not controller.instances()["c"]["alive"], 15, "c marked dead")
        wait_for(lambda: len(controller.get("/history")["a"]) >= 3, 30, "heartbeats after the lookups")

        dom = chromium("--dump-dom", controller.url + "/").stdout
        rows = {iid: state for state, iid in re.findall(r"<tr class=\"(\w+)\" data-id=\"(\w)\"", dom)}
        assert rows == {"a": "alive", "b": "alive", "c": "dead"}
        assert "2 of 3 instances alive" in dom and "5 chunks indexed" in dom
        a_row = dom[dom.index('data-id="a"') :].split("</tr>")[0]
        assert '<td class="num hit">50.0%</td>' in a_row and a_row.count("KiB") == 2  # hit rate, L1 and L2 usage
        assert 'class="series" data-id="a"' in dom  # its hit rate drawn over time

        out = Path(os.environ.get("KVTIER_ARTIFACTS", ROOT / ".artifacts"))
        out.mkdir(parents=True, exist_ok=True)
        shot = out / "dashboard.png"
        shot.unlink(missing_ok=True)
        chromium(f"--screenshot={shot}", "--window-size=1100,720", controller.url + "/")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    finally:
        for inst in insts:
            inst.stop()
        controller.stop()
