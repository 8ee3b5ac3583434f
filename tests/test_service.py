"""`backer service install|uninstall`: the systemd user unit and the launchd agent.
Nothing is ever enabled or started here."""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from backer.config import service
from backer.errors import BackerError


def _run(tmp_path: Path, *args: str, backer_home: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(tmp_path), "BACKER_HOME": backer_home}
    env.pop("XDG_CONFIG_HOME", None)
    return subprocess.run(
        [sys.executable, "-m", "backer", "service", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _verify(unit: Path, tmp_path: Path) -> None:
    """systemd's own check of the unit, as the user manager would load it."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(runtime)}
    checked = subprocess.run(
        ["systemd-analyze", "verify", "--user", str(unit)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0 and not checked.stderr.strip(), checked.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="systemd units are Linux's")
def test_install_writes_a_user_unit_running_this_backer_that_systemd_accepts(
    tmp_path: Path,
) -> None:
    """A BACKER_HOME with a space, ``%`` and ``$`` (specifier and variable characters
    in a unit) reaches the unit unchanged."""
    backer_home = str(tmp_path / "my home %h $x")
    result = _run(tmp_path, "install", backer_home=backer_home)
    assert result.returncode == 0, result.stderr
    unit = tmp_path / ".config" / "systemd" / "user" / "backer.service"
    text = unit.read_text()
    assert f"wrote {unit}" in result.stdout
    assert result.stdout.strip().endswith("systemctl --user enable --now backer")
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    program = exec_start.split('"')[1]
    assert Path(program).is_absolute() and os.access(program, os.X_OK)
    assert exec_start.endswith('"run"')
    assert "Restart=on-failure" in text
    assert 'Environment="BACKER_HOME=' + backer_home.replace("%", "%%").replace("$", "$$") in text
    _verify(unit, tmp_path)
    # the unit's command is this backer: it answers as the one that wrote it
    version = subprocess.run(
        [*service.command(), "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    assert "version" in version.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="systemd units are Linux's")
def test_uninstall_removes_the_unit_and_refuses_an_enabled_one(tmp_path: Path) -> None:
    home = str(tmp_path / "backer-home")
    assert _run(tmp_path, "install", backer_home=home).returncode == 0
    unit = tmp_path / ".config" / "systemd" / "user" / "backer.service"
    wants = unit.parent / "default.target.wants" / "backer.service"
    wants.parent.mkdir()
    wants.symlink_to(unit)  # what 'systemctl --user enable' leaves
    refused = _run(tmp_path, "uninstall", backer_home=home)
    assert refused.returncode == 1 and "systemctl --user disable --now backer" in refused.stderr
    assert refused.stderr.count("\n") == 1 and unit.exists()
    wants.unlink()
    removed = _run(tmp_path, "uninstall", backer_home=home)
    assert removed.returncode == 0 and f"removed {unit}" in removed.stdout
    assert not unit.exists()
    again = _run(tmp_path, "uninstall", backer_home=home)
    assert again.returncode == 1 and "no backer service is installed" in again.stderr
    assert again.stderr.count("\n") == 1 and "Traceback" not in again.stderr


def test_on_macos_install_writes_a_launch_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKER_HOME", str(tmp_path / "backer-home"))
    installed = service.install(system="darwin", user_home=tmp_path)
    assert installed.path == tmp_path / "Library" / "LaunchAgents" / "org.backer.run.plist"
    agent = plistlib.loads(installed.path.read_bytes())
    assert agent["Label"] == "org.backer.run"
    assert agent["ProgramArguments"] == [*service.command(), "run"]
    assert agent["RunAtLoad"] is True and agent["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["EnvironmentVariables"] == {"BACKER_HOME": str(tmp_path / "backer-home")}
    assert installed.enable == f"launchctl bootstrap gui/{os.getuid()} {installed.path}"
    path, stop = service.uninstall(system="darwin", user_home=tmp_path)
    assert path == installed.path and not path.exists() and "launchctl bootout" in stop


def test_other_platforms_and_line_breaks_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BackerError, match="no service manager"):
        service.install(system="win32", user_home=tmp_path)
    with pytest.raises(BackerError, match="line break"):
        service.systemd_unit(["/bin/backer", "run"], "/home/x\n[Service]\nExecStartPre=/bin/rm")
