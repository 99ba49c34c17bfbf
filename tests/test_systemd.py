"""deploy/proxy-app.service: ``systemd-analyze verify`` on a scratch copy, and its key directives.

``systemd-analyze verify`` checks that the Exec*= binaries exist, so the scratch copy points
the install paths (/opt/proxy-app, its .venv) at this checkout and the running venv, and the
service user at root; every directive is kept. The directive tests read the unit as written.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "proxy-app.service"
ENV_EXAMPLE = ROOT / "deploy" / "proxy-app.env.example"
GUNICORN_CONF = ROOT / "proxy_app" / "gunicorn_conf.py"
EXAMPLE_CONFIG = ROOT / "config.yaml"
INSTALL_DIR = "/opt/proxy-app"
INSTALL_BIN = "/opt/proxy-app/.venv/bin/"


def parse_unit(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every directive, in order; repeated keys stay separate."""
    directives = []
    section = None
    logical = ""
    for raw in text.splitlines():
        line = logical + raw.strip() if logical else raw.strip()
        logical = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            logical = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep and section, f"not a directive: {raw!r}"
        directives.append((section, key.strip(), value.strip()))
    return directives


def values(directives, section: str, key: str) -> list[str]:
    return [v for s, k, v in directives if s == section and k == key]


def only(directives, section: str, key: str) -> str:
    found = values(directives, section, key)
    assert len(found) == 1, f"[{section}] {key}= set {len(found)} times: {found}"
    return found[0]


def seconds(span: str) -> float:
    """A systemd time span ("330", "330s", "5min 30s") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts and re.fullmatch(r"(\s*\d+(?:\.\d+)?\s*[a-z]*)+\s*", span), span
    return sum(float(number) * units[unit] for number, unit in parts)


def graceful_timeout_default() -> int:
    match = re.search(r'_int\(\s*"PROXY_GRACEFUL_TIMEOUT"\s*,\s*(\d+)\s*\)', GUNICORN_CONF.read_text())
    assert match, "deploy/gunicorn.conf.py no longer reads PROXY_GRACEFUL_TIMEOUT with _int(name, default)"
    return int(match.group(1))


@pytest.fixture(scope="module")
def unit():
    return parse_unit(UNIT.read_text())


# -- directives ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "expected"),
    [
        ("Service", "Type", "notify"),
        ("Service", "KillMode", "mixed"),
        ("Service", "Restart", "on-failure"),
        ("Service", "User", "proxy-app"),
        ("Service", "Group", "proxy-app"),
        ("Service", "WorkingDirectory", INSTALL_DIR),
        ("Service", "RuntimeDirectory", "proxy-app"),
        # STATE_DIRECTORY=/var/lib/proxy-app: the SQLite database and the usage spool.
        ("Service", "StateDirectory", "proxy-app"),
        ("Service", "NoNewPrivileges", "yes"),
        ("Service", "ProtectSystem", "strict"),
        ("Service", "ProtectHome", "yes"),
        ("Service", "PrivateTmp", "yes"),
        ("Install", "WantedBy", "multi-user.target"),
    ],
)
def test_directive(unit, section, key, expected):
    assert only(unit, section, key) == expected


def test_notify_access_lets_the_gunicorn_master_report_ready(unit):
    # The arbiter, the main PID, sends READY=1 itself; workers never notify.
    assert only(unit, "Service", "NotifyAccess") in ("main", "all")


def test_reload_sends_hup_to_the_main_pid(unit):
    reloads = [shlex.split(v) for v in values(unit, "Service", "ExecReload")]
    assert reloads, "no ExecReload="
    argv = reloads[-1]
    assert Path(argv[0]).name == "kill"
    assert argv[1:] in (["-HUP", "$MAINPID"], ["-s", "HUP", "$MAINPID"], ["-1", "$MAINPID"])


def test_stop_timeout_exceeds_gunicorn_graceful_timeout(unit):
    graceful = graceful_timeout_default()
    assert seconds(only(unit, "Service", "TimeoutStopSec")) > graceful


def test_secrets_come_from_a_required_environment_file(unit):
    # A leading "-" would make a missing file silently acceptable.
    assert only(unit, "Service", "EnvironmentFile") == "/etc/proxy-app/env"


def test_exec_start_runs_gunicorn_with_the_deploy_config(unit):
    argv = shlex.split(only(unit, "Service", "ExecStart"))
    assert argv[0] == INSTALL_BIN + "gunicorn"
    assert argv[1] == "-c"
    assert argv[2] == f"{INSTALL_DIR}/deploy/gunicorn.conf.py"


def test_environment(unit):
    env = dict(item.split("=", 1) for value in values(unit, "Service", "Environment") for item in shlex.split(value))
    assert env["CONFIG_FILE_PATH"] == "/etc/proxy-app/config.yaml"
    assert env["PROXY_BIND"] == "127.0.0.1:4000"
    # Inside RuntimeDirectory=, so it is empty at every start.
    runtime = "/run/" + only(unit, "Service", "RuntimeDirectory")
    assert env["PROMETHEUS_MULTIPROC_DIR"].startswith(runtime + "/")


def test_no_trailing_comments():
    # systemd would take "value # comment" as the value.
    for number, line in enumerate(UNIT.read_text().splitlines(), 1):
        if line.strip() and not line.lstrip().startswith(("#", ";")):
            assert " #" not in line and "\t#" not in line, f"{UNIT.name}:{number}: {line}"


def test_env_example_names_every_variable_the_deploy_reads():
    example = ENV_EXAMPLE.read_text()
    conf = GUNICORN_CONF.read_text()
    names = set(re.findall(r'_int\(\s*"([A-Z_]+)"', conf))
    names |= set(re.findall(r'os\.environ(?:\.get\(\s*|\[\s*)"([A-Z_]+)"', conf))
    config_lines = [line for line in EXAMPLE_CONFIG.read_text().splitlines() if not line.lstrip().startswith("#")]
    names |= set(re.findall(r"os\.environ/([A-Za-z_][A-Za-z0-9_]*)", "\n".join(config_lines)))
    names.add("LITELLM_MASTER_KEY")
    assert {"COHERE_API_KEY", "PROXY_GRACEFUL_TIMEOUT", "WEB_CONCURRENCY"} <= names
    missing = sorted(name for name in names if not re.search(rf"^#?\s*{name}=", example, re.MULTILINE))
    assert not missing, f"{ENV_EXAMPLE.name} does not mention {missing}"


# -- systemd-analyze verify -----------------------------------------------------------------


def scratch_unit(tmp_path: Path, text: str) -> Path:
    """The unit with its install paths pointed at this checkout and venv, User/Group root."""
    venv_bin = Path(sys.executable).parent
    if not (venv_bin / "gunicorn").exists():
        pytest.skip(f"no gunicorn next to {sys.executable}; run the tests from the project venv")
    env_file = tmp_path / "env"
    env_file.write_text("")
    text = text.replace(INSTALL_BIN, f"{venv_bin}/").replace(INSTALL_DIR, str(ROOT))
    text = text.replace("EnvironmentFile=/etc/proxy-app/env", f"EnvironmentFile={env_file}")
    text = re.sub(r"^(User|Group)=.*$", r"\1=root", text, flags=re.MULTILINE)
    path = tmp_path / "proxy-app.service"
    path.write_text(text)
    return path


def verify(path: Path) -> tuple[int, list[str]]:
    """Run systemd-analyze verify; return its exit code and the output lines about this unit."""
    analyze = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not Path(analyze).exists():
        pytest.skip("systemd-analyze not installed (no systemd here); the unit is not verified")
    result = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    # Lines about other units (a broken unit elsewhere on the host) are not ours to judge.
    ours = [line for line in lines if str(path) in line or path.name in line]
    return result.returncode, ours if ours or result.returncode == 0 else lines


def test_systemd_analyze_verify_is_clean(tmp_path):
    original = UNIT.read_text()
    path = scratch_unit(tmp_path, original)
    # Only paths and the user changed: the same directives, in the same order.
    assert [(s, k) for s, k, _ in parse_unit(path.read_text())] == [(s, k) for s, k, _ in parse_unit(original)]
    code, problems = verify(path)
    assert problems == []
    assert code == 0


def test_systemd_analyze_verify_catches_mistakes(tmp_path):
    # Guards the test above against a verify (or a filter) that reports nothing at all.
    text = UNIT.read_text().replace("KillMode=mixed", "KillMode=mixed\nTimeoutStopSec=soon\nNoSuchKey=1")
    _code, problems = verify(scratch_unit(tmp_path, text))
    assert any("NoSuchKey" in line for line in problems), problems
    assert any("soon" in line for line in problems), problems
