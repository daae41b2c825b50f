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

pytestmark = [pytest.mark.slow, pytest.mark.alone]  # a benchmark run: load on both cores

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc builds the load generator")
def test_quick_benchmark_delivers_every_frame(tmp_path):
    report_path = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--targets", "push",
         "--scenarios", "fanout-1k,burst-10k,rooms-10k,connect,topics", "--json", str(report_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert run.returncode == 0, run.stderr[-3000:]
    scenarios = orjson.loads(report_path.read_bytes())["scenarios"]
    for name in ("fanout-1k", "rooms-10k"):
        result = scenarios[name]["targets"]["push"]["result"]
        assert result["frames_received"] == result["frames_expected"] > 0, (name, result)
        assert (result["lost"], result["out_of_order"], result["duplicates"], result["non_2xx"]) == (0, 0, 0, 0)
        assert result["server_closes"] == result["disconnects"] == 0, (name, result)
    # Open loop: what was answered 503 (delivery behind) was not accepted, so it is neither expected nor lost.
    burst = scenarios["burst-10k"]["targets"]["push"]["result"]
    assert burst["frames_received"] == burst["frames_expected"] > 0, burst
    assert (burst["lost"], burst["out_of_order"], burst["duplicates"]) == (0, 0, 0), burst
    assert burst["non_2xx"] == burst["refused"] and burst["published"] == 30, burst
    connected = scenarios["connect"]["targets"]["push"]["connected"]
    assert connected["failed"] == 0 and connected["conns"] == connected["requested"] > 0, connected
    rows = scenarios["topics"]["targets"]["push"]["rows"]
    assert len(rows) == 3 and all((row["lost"], row["ooo"], row["dup"], row["closes"], row["non-2xx"]) == (0,) * 5
                                  and row["publishes/s"] > 0 for row in rows), rows


def test_quick_reconnect_storm_brings_every_client_back(tmp_path):
    """The server restarted under joined phoenix.js-like clients: every one of them is joined again, through the
    drain's refusals and the time nothing listens."""
    report_path = tmp_path / "storm.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--targets", "push", "--scenarios", "reconnect-storm",
         "--json", str(report_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stderr[-3000:]
    out = orjson.loads(report_path.read_bytes())["scenarios"]["reconnect-storm"]["targets"]["push"]
    assert "error" not in out, out
    rejoined = out["rejoined"]
    assert rejoined["complete"] and rejoined["conns"] == out["joined"]["conns"] > 0, rejoined
    # Each client came back at least once; the failed attempts are the drain's 503s and the refused connects.
    assert rejoined["attempts"] - rejoined["failed_attempts"] == rejoined["conns"], rejoined
    assert set(rejoined["failed_answers"]) <= {"503"}, rejoined
    assert out["server"]["cpu_s"] > 0, out


def test_rooms_in_process_delivers_every_publish():
    """benchmarks/rooms_inprocess.py (rooms-10k's Python alone) still drives the front door it measures: it
    checks every publish was answered and reached its room's 10 sessions, and prints its figure."""
    run = subprocess.run([sys.executable, "benchmarks/rooms_inprocess.py", "--rooms", "20", "--publishes", "200"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "200 publishes to rooms of 10 (20 rooms)" in run.stderr, run.stderr


def _run_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_rounds_report_each_column_median_and_add_up_what_went_wrong():
    """`run.py --rounds N`: a target's row is the median of its rounds, but a loss, a failed connect or a
    close in any one round is summed, so a bad round cannot hide behind two good ones."""
    bench = _run_module()
    rounds = [{"row": {"conns": 500, "connects/s": rate, "failed": failed, "lost": 0, "note": "x"}, "run_seconds": 1.0}
              for rate, failed in ((5000, 0), (9000, 2), (7000, 0))]
    combined = bench.combine_rounds(rounds)
    assert combined["row"] == {"conns": 500, "connects/s": 7000, "failed": 2, "lost": 0, "note": "x"}
    assert combined["rounds"] == rounds and combined["failed_rounds"] == 0 and combined["run_seconds"] == 3.0
    assert bench.combine_rounds(rounds[:1]) is rounds[0]
    # A round that failed outright is counted, and the median is over the rounds that ran.
    with_error = bench.combine_rounds([rounds[0], {"error": "server exited"}, rounds[2]])
    assert with_error["row"]["connects/s"] == 6000 and with_error["failed_rounds"] == 1
    scenario = next(s for s in bench.scenarios() if s.name == "connect")
    nchan = bench.combine_rounds([{"row": {"connects/s": 20000, "us CPU/conn": 20.0}}] * 3)
    push = bench.combine_rounds([{"row": {"connects/s": r, "us CPU/conn": 100.0}} for r in (5000, 9000, 7000)])
    text = bench.table(scenario, {"push": push, "nchan": nchan})
    assert "push connects/s vs nchan, round by round: 0.25x, 0.45x, 0.35x" in text, text
    assert "(medians of 3 rounds, the targets taking turns)" in text, text
