"""`push-service --version` prints `push-service <version>`, the version pip installed (package metadata)."""

from __future__ import annotations

import asyncio
import importlib.metadata
import sys

import pytest

import push_service
from conftest import ROOT
from push_service import cli


async def test_version_command_prints_the_installed_version() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "push_service", "--version", cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()
    assert stdout.decode() == f"push-service {importlib.metadata.version('push-service')}\n"


def run_version(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_version_comes_from_package_metadata(monkeypatch, capsys) -> None:
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.8.7" if name == "push-service" else real(name))
    assert run_version(capsys) == "push-service 9.8.7\n"


def test_version_without_installed_metadata_is_the_source_version(monkeypatch, capsys) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert run_version(capsys) == f"push-service {push_service.__version__}\n"
