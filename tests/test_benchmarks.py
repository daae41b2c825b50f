"""The benchmark harness keeps working: `benchmarks/run.py --quick` against the real server, with the
C load generator built by gcc, counts every frame and loses none. Speed is not asserted here (that is
what the figures in docs/performance.md are for); the design's ratios are in test_performance.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

pytestmark = pytest.mark.slow  # a benchmark run

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc builds the load generator")
def test_quick_benchmark_delivers_every_frame(tmp_path):
    report_path = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--targets", "push",
         "--scenarios", "fanout-1k,rooms-10k,connect,topics", "--json", str(report_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert run.returncode == 0, run.stderr[-3000:]
    scenarios = orjson.loads(report_path.read_bytes())["scenarios"]
    for name in ("fanout-1k", "rooms-10k"):
        result = scenarios[name]["targets"]["push"]["result"]
        assert result["frames_received"] == result["frames_expected"] > 0, (name, result)
        assert (result["lost"], result["out_of_order"], result["duplicates"], result["non_2xx"]) == (0, 0, 0, 0)
        assert result["server_closes"] == result["disconnects"] == 0, (name, result)
    connected = scenarios["connect"]["targets"]["push"]["connected"]
    assert connected["failed"] == 0 and connected["conns"] == connected["requested"] > 0, connected
    rows = scenarios["topics"]["targets"]["push"]["rows"]
    assert len(rows) == 3 and all((row["lost"], row["ooo"], row["dup"], row["closes"], row["non-2xx"]) == (0,) * 5
                                  and row["publishes/s"] > 0 for row in rows), rows
