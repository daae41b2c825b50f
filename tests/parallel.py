"""The suite on two workers (pytest-xdist; pyproject's addopts say `-n 2 --dist loadfile`).

- A test file runs whole on one worker, in order, so its module-scoped servers start once.
- The files whose nodes share the Redis and NATS at 127.0.0.1 (SHARED_BROKER_FILES) run one after
  another: live nodes of two of them would see each other on the control channel. A worker holds the
  "brokers" lock from the first test of such a file to the end of its last.
- A test marked `alone` (it measures memory, load or the server's pace) runs while no other test runs:
  it holds the "run" lock exclusively, every other test holds it shared.

Locks are flock(2)s on files of this run, always taken in the order brokers, gate, run, so no two workers
wait for each other. (Not xdist's `loadgroup`: pytest 9.2 ignores the node ids it rewrites, xdist#1386.)

Without xdist (`-n 0`, or `-p no:xdist`) the tests run one by one and nothing here applies.
"""

from __future__ import annotations

import fcntl
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

SHARED_BROKER_FILES = frozenset({
    "test_chaos.py", "test_cluster.py", "test_console_browser.py", "test_history.py", "test_logs.py",
    "test_longpoll_relay.py", "test_nats_wire.py", "test_redis_wire.py",
})
_FOLDER = pytest.StashKey[Path]()
_LOCKS = pytest.StashKey[dict[str, IO[bytes]]]()
_HOLDS_BROKERS = pytest.StashKey[bool]()
_WORKER_KEY = "push_service_locks"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "alone: runs while no other test of the run does (it measures memory, "
                                       "load or pace)")
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:  # the controller (or a run without workers): the lock files' folder
        config.stash[_FOLDER] = Path(tempfile.mkdtemp(prefix="push-service-tests-"))
        return
    folder = Path(workerinput[_WORKER_KEY])
    # "gate" lets an `alone` test that waits for "run" stop new tests from starting, so it cannot be
    # starved by a worker that takes "run" shared again between its tests.
    config.stash[_LOCKS] = {name: open(folder / name, "ab") for name in ("brokers", "gate", "run")}
    config.stash[_HOLDS_BROKERS] = False


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: object) -> None:
    """(xdist, on the controller) tells each worker where the lock files are."""
    node.workerinput[_WORKER_KEY] = str(node.config.stash[_FOLDER])  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    for lock in config.stash.get(_LOCKS, {}).values():
        lock.close()
    if _FOLDER in config.stash:
        shutil.rmtree(config.stash[_FOLDER], ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    config = item.config
    locks = config.stash.get(_LOCKS, None)
    if locks is None:
        yield
        return
    brokers, gate, run = (locks[name].fileno() for name in ("brokers", "gate", "run"))
    if item.path.name in SHARED_BROKER_FILES and not config.stash[_HOLDS_BROKERS]:
        fcntl.flock(brokers, fcntl.LOCK_EX)
        config.stash[_HOLDS_BROKERS] = True
    if item.get_closest_marker("alone") is not None:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(run, fcntl.LOCK_EX)
    else:
        fcntl.flock(gate, fcntl.LOCK_SH)
        fcntl.flock(run, fcntl.LOCK_SH)
        fcntl.flock(gate, fcntl.LOCK_UN)
    try:
        yield  # the test, with its fixtures' setup and teardown (a module's, after its last test)
    finally:
        fcntl.flock(run, fcntl.LOCK_UN)
        fcntl.flock(gate, fcntl.LOCK_UN)
        if config.stash[_HOLDS_BROKERS] and (nextitem is None or nextitem.path != item.path):
            fcntl.flock(brokers, fcntl.LOCK_UN)
            config.stash[_HOLDS_BROKERS] = False
