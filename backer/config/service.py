"""Run ``backer run`` at login: a systemd user unit (Linux) or a launchd agent (macOS).

``install`` writes the file and says the one command that enables it; nothing here
starts, enables or stops a service (that stays the person's decision, and tests must
never do it). The unit runs this very backer (the absolute path of the running
installation) with the ``BACKER_HOME`` in force when it was installed.
"""

from __future__ import annotations

import os
import plistlib
import sys
from dataclasses import dataclass
from pathlib import Path

from backer.db.recovery import write_durably
from backer.errors import BackerError

UNIT_NAME = "backer.service"
AGENT_LABEL = "org.backer.run"


@dataclass(frozen=True)
class Installed:
    path: Path
    text: str  # what was written
    enable: str  # the command that enables and starts it


def command() -> list[str]:
    """This backer, by absolute path: the console script beside the running Python if
    there is one, else the interpreter with ``-m backer``."""
    script = Path(sys.executable).parent / "backer"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script.absolute())]
    return [str(Path(sys.executable).absolute()), "-m", "backer"]


def _quoted(arg: str) -> str:
    """One argument for a systemd unit line: quoted, with ``%`` and ``$`` escaped (they
    are specifiers and variables there)."""
    if any(char in arg for char in "\n\r\0"):
        raise BackerError(f"cannot put a line break or NUL in a service file: {arg!r}")
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def systemd_unit(argv: list[str], backer_home: str | None) -> str:
    """A user unit running ``argv``: restarted when it fails, stopped with SIGTERM
    (which ``backer run`` answers by closing its sessions and exiting within 5 s)."""
    lines = [
        "[Unit]",
        "Description=backer: mirror this device's shares with its other devices",
        "",
        "[Service]",
        "Type=exec",
        "ExecStart=" + " ".join(_quoted(arg) for arg in argv),
        "Restart=on-failure",
        "RestartSec=5",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=15",
    ]
    if backer_home:
        lines.append("Environment=" + _quoted(f"BACKER_HOME={backer_home}"))
    lines += ["", "[Install]", "WantedBy=default.target", ""]
    return "\n".join(lines)


def launchd_plist(argv: list[str], backer_home: str | None, logs: Path) -> bytes:
    """A launch agent running ``argv`` at login, started again unless it exited 0."""
    agent: dict[str, object] = {
        "Label": AGENT_LABEL,
        "ProgramArguments": argv,
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ProcessType": "Background",
        "StandardErrorPath": str(logs / "backer.log"),
    }
    if backer_home:
        agent["EnvironmentVariables"] = {"BACKER_HOME": backer_home}
    return plistlib.dumps(agent)


def _location(system: str, user_home: Path) -> Path:
    if system.startswith("linux"):
        config = os.environ.get("XDG_CONFIG_HOME") or str(user_home / ".config")
        return Path(config) / "systemd" / "user" / UNIT_NAME
    if system == "darwin":
        return user_home / "Library" / "LaunchAgents" / f"{AGENT_LABEL}.plist"
    raise BackerError(f"no service manager backer knows on this platform ({system})")


def install(
    system: str = sys.platform,
    user_home: Path | None = None,
    argv: list[str] | None = None,
) -> Installed:
    """Write the unit (or agent) that runs ``backer run``, replacing an older one."""
    user_home = user_home or Path.home()
    path = _location(system, user_home)
    argv = [*(argv or command()), "run"]
    backer_home = os.environ.get("BACKER_HOME")
    if backer_home:
        backer_home = str(Path(backer_home).absolute())
    if system == "darwin":
        data = launchd_plist(argv, backer_home, user_home / "Library" / "Logs")
        enable = f"launchctl bootstrap gui/{os.getuid()} {path}"
    else:
        data = systemd_unit(argv, backer_home).encode()
        enable = "systemctl --user enable --now backer"
    write_durably(path, data)
    return Installed(path, data.decode(), enable)


def uninstall(system: str = sys.platform, user_home: Path | None = None) -> tuple[Path, str]:
    """Remove the unit (or agent); (its path, the command that stops what still runs).

    An enabled systemd unit is refused: removing its file would leave the link that
    enables it dangling, so the person disables it first."""
    user_home = user_home or Path.home()
    path = _location(system, user_home)
    if not path.exists():
        raise BackerError(f"no backer service is installed ({path} does not exist)")
    if system == "darwin":
        stop = f"launchctl bootout gui/{os.getuid()}/{AGENT_LABEL}"
    else:
        wants = path.parent / "default.target.wants" / UNIT_NAME
        if wants.is_symlink() or wants.exists():
            raise BackerError(
                "the backer service is enabled: run 'systemctl --user disable --now backer' "
                "first, then 'backer service uninstall'"
            )
        stop = "systemctl --user daemon-reload"
    path.unlink()
    return path, stop
