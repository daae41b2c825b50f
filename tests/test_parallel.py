"""tests/parallel.py keeps its promises: a small suite of its own, run by pytest on two workers, logs
when each test starts and ends; the `alone` test overlaps no other, the shared-broker files never overlap
each other, and the other files do run side by side."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

pytestmark = pytest.mark.slow  # two pytest workers start

HERE = Path(__file__).resolve().parent
# Each test lasts long enough for the two workers to overlap: the time is the case here.
TEST_FILE = '''
import os, time, orjson, pytest

def record(name):
    start = time.monotonic()
    time.sleep({seconds})
    with open(os.environ["INTERVALS"], "ab") as log:
        log.write(orjson.dumps([name, os.environ["PYTEST_XDIST_WORKER"], start, time.monotonic()]) + b"\\n")

{mark}
@pytest.mark.parametrize("n", range({count}))
def test_it(n):
    record("{name}")
'''


def test_alone_and_grouped_tests_do_not_overlap(tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text('pytest_plugins = ["parallel"]\n')
    files = {"test_history.py": ("", 4),
             "test_chaos.py": ("", 4), "test_one.py": ("", 6), "test_two.py": ("", 12),
             "test_z_alone.py": ("pytestmark = pytest.mark.alone", 2)}  # last: the other worker is busy then
    for name, (mark, count) in files.items():
        (suite / name).write_text(TEST_FILE.format(seconds=0.15, mark=mark, count=count, name=name))
    intervals = tmp_path / "intervals.jsonl"
    env = {**os.environ, "INTERVALS": str(intervals), "PYTHONPATH": str(HERE)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
                           "--dist", "loadfile", "-o", "addopts=", str(suite)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = [orjson.loads(line) for line in intervals.read_bytes().splitlines()]
    assert len(runs) == sum(count for _, count in files.values())

    def overlap(a: list, b: list) -> bool:
        return a[2] < b[3] and b[2] < a[3]

    alone = [run for run in runs if run[0] == "test_z_alone.py"]
    others = [run for run in runs if run[0] != "test_z_alone.py"]
    assert not [(a, b) for a in alone for b in others if overlap(a, b)]
    brokers = [run for run in runs if run[0] in ("test_history.py", "test_chaos.py")]
    assert not [(a, b) for a in brokers for b in brokers if a is not b and overlap(a, b)]
    # ... and the run is parallel: some tests of the two workers did run at the same time.
    assert [(a, b) for a in others for b in others if a[1] != b[1] and overlap(a, b)]
