"""Real PostgreSQL and Redis servers for the store tests: no mocks, nothing shared with the machine.

Each server is a child process of the test run: it listens on 127.0.0.1 on a port picked at
run time (bound to port 0, read, closed), keeps its data in a temporary directory, and is
stopped by its PID (``.stop()``; ``.start()`` starts it again on the same port with the same
data directory, so a test can take the database or Redis away and bring it back). The
directories are removed when the server is closed. Each child also asks the kernel to signal it
when the test process dies (``PR_SET_PDEATHSIG``, set by util-linux's ``setpriv``), so a test run
killed outright does not leave servers behind.

PostgreSQL runs ``initdb`` and ``postgres`` from the Debian layout (``/usr/lib/postgresql/*/bin``,
the newest version found) as the ``postgres`` user when the tests run as root (PostgreSQL refuses
to run as root), with trust authentication on loopback and ``fsync=off`` (a test database need
not survive a machine crash; commits are still synchronous, so a stopped and restarted server
keeps every committed row). Redis runs ``redis-server`` from PATH with no persistence: a restart
starts empty.

CI (``.ci/run``) installs the Debian packages when they are missing, like nginx for the nginx
test::

    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
    command -v redis-server >/dev/null || need+=(redis-server)

(``apt-get install postgresql`` also creates the ``postgres`` user.) A missing binary fails the
tests that need it with a message naming the package; they are never skipped.

Fixtures: a test module registers this module as a plugin::

    pytest_plugins = ("tests.servers",)

and takes ``postgres``, ``redis_server`` (session scope: the servers), ``pg_url`` (the
``postgresql://`` URL of a new empty database for each test, dropped afterwards) or ``redis_url``
(the ``redis://`` URL of the server, flushed before each test) as arguments. Both function-scoped
fixtures restart a server a previous test left stopped. (Importing the fixtures by name works
too, but ruff then reports every test argument of that name as a redefinition, F811.) The servers
are shared by the whole run: one of each per process, however many modules use them.

:func:`in_processes` runs a function in several forked processes released at the same moment,
for the tests of concurrent writers.
"""

from __future__ import annotations

import contextlib
import glob
import multiprocessing
import os
import pwd
import queue
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import traceback
import uuid
from pathlib import Path

import psycopg
import pytest

START_TIMEOUT = 30.0  # seconds for a server to answer after it is started
STOP_TIMEOUT = 15.0  # seconds for a server to exit after it is signalled
PORT_ATTEMPTS = 3  # a picked port can be taken by another process before the server binds it
PG_USER = "postgres"  # the Unix user that runs PostgreSQL when the tests run as root


class ServerMissing(RuntimeError):
    """A server binary (or the user to run it) is not installed."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the server binds it just after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent(sig: str, argv: list[str]) -> list[str]:
    """``argv`` run so that it gets ``sig`` when the test process dies, even by SIGKILL:
    util-linux's setpriv sets PR_SET_PDEATHSIG and execs the server (same PID, same parent).
    Not a preexec_fn, which is unsafe once the test process has threads. Without setpriv the
    server runs as it is (the fixtures still stop it)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, f"--pdeathsig={sig}", "--", *argv] if setpriv else argv


def _stop_pid(proc: subprocess.Popen, sig: int) -> None:
    """Signal a child this module started and reap it; SIGKILL if it outlives STOP_TIMEOUT."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def postgres_bindir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with initdb and postgres (Debian's layout)."""
    found = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        bindir = Path(initdb).parent
        version = bindir.parent.name
        if (bindir / "postgres").exists() and version.isdigit():
            found.append((int(version), bindir))
    if not found:
        raise ServerMissing(
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb and postgres): "
            "install the Debian package postgresql (apt-get install -y postgresql)"
        )
    return max(found)[1]


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise ServerMissing("redis-server not found on PATH: install the Debian package redis-server (apt-get install -y redis-server)")
    return path


def _run_as() -> dict:
    """Popen arguments that run a child as the postgres user when we are root (PostgreSQL
    refuses root); nothing otherwise. No supplementary groups: root's would be kept."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam(PG_USER)
    except KeyError:
        raise ServerMissing(f"no Unix user {PG_USER!r} to run PostgreSQL as: install the Debian package postgresql") from None
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _make_dir(parent: str | os.PathLike | None, prefix: str, owner: dict) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    if owner:
        os.chown(path, owner["user"], owner["group"])
    return path


class Postgres:
    """A PostgreSQL server of our own: ``.url`` (the ``postgres`` database, superuser
    ``postgres``, no password), ``.new_database()``, ``.stop()``, ``.start()``, ``.close()``."""

    def __init__(self, parent: str | os.PathLike | None = None):
        self.bindir = postgres_bindir()
        self._as = _run_as()
        # The data directory must belong to the user running the server, and its parent must
        # be traversable by that user: a directory of its own under the system temp dir.
        self.base = _make_dir(parent, "proxy-test-pg-", self._as)
        self.data = self.base / "data"
        self.sockets = self.base / "sock"  # Unix sockets here, not in /var/run/postgresql
        self.log_path = self.base / "postgres.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._created = 0
        try:
            self._initdb()
            self._start_on_free_port()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return self.url_of("postgres")

    def url_of(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _child(self, argv: list[str], **kwargs) -> dict:
        return {"args": argv, "cwd": self.base, "env": {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}, **self._as, **kwargs}

    def _initdb(self) -> None:
        self.sockets.mkdir()
        if self._as:
            os.chown(self.sockets, self._as["user"], self._as["group"])
        argv = [str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C.UTF-8"]
        argv += ["--no-sync", "--no-instructions"]
        done = subprocess.run(**self._child(argv), capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    def _start_on_free_port(self) -> None:
        for attempt in range(PORT_ATTEMPTS):
            self.port = free_port()
            try:
                self.start()
                return
            except PortTaken:
                if attempt == PORT_ATTEMPTS - 1:
                    raise

    def start(self) -> None:
        """Start the server (again) on its port with its data directory; wait until it answers."""
        if self.running:
            return
        options = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.sockets),
            "fsync": "off",  # see the module docstring
            "full_page_writes": "off",
            "max_connections": "200",  # several helpers' pools and test processes at once
            "log_min_messages": "warning",
        }
        argv = [str(self.bindir / "postgres"), "-D", str(self.data)]
        for name, value in options.items():
            argv += ["-c", f"{name}={value}"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                **self._child(_die_with_parent("INT", argv)),  # SIGINT: a fast shutdown
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = _tail(self.log_path)
                if re.search(r"could not (bind|create any TCP/IP sockets)|Address already in use", log):
                    raise PortTaken(self.port)
                raise RuntimeError(f"postgres exited {self.proc.returncode}:\n{log}")
            try:
                with psycopg.connect(self.url, connect_timeout=2, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.Error as exc:  # refused, or "the database system is starting up"
                error = exc
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"postgres not answering after {START_TIMEOUT}s ({error}):\n{_tail(self.log_path)}")

    def stop(self) -> None:
        """Stop by PID with a fast shutdown (SIGINT): clients are disconnected, committed data kept."""
        if self.proc is not None:
            _stop_pid(self.proc, signal.SIGINT)

    def new_database(self) -> str:
        """Create an empty database; return its URL."""
        self._created += 1
        name = f"test_{self._created}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.url, connect_timeout=5, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url_of(name)

    def drop_database(self, url: str) -> None:
        """Drop a database made by new_database, disconnecting its clients (FORCE)."""
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url, connect_timeout=5, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PortTaken(RuntimeError):
    """The picked port was taken before the server bound it: pick another."""


class Redis:
    """A redis-server of our own, no persistence: ``.url``, ``.stop()``, ``.start()``, ``.close()``."""

    def __init__(self, parent: str | os.PathLike | None = None):
        self.binary = redis_binary()
        self.base = _make_dir(parent, "proxy-test-redis-", {})
        self.log_path = self.base / "redis.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        try:
            for attempt in range(PORT_ATTEMPTS):
                self.port = free_port()
                try:
                    self.start()
                    break
                except PortTaken:
                    if attempt == PORT_ATTEMPTS - 1:
                        raise
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the server (again, empty) on its port; wait until it answers PING."""
        if self.running:
            return
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--daemonize", "no", "--dir", str(self.base), "--logfile", ""]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                _die_with_parent("TERM", argv),
                cwd=self.base,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = _tail(self.log_path)
                if "Address already in use" in log:
                    raise PortTaken(self.port)
                raise RuntimeError(f"redis-server exited {self.proc.returncode}:\n{log}")
            if self.command(b"PING") == b"+PONG":
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server not answering after {START_TIMEOUT}s:\n{_tail(self.log_path)}")

    def command(self, name: bytes) -> bytes | None:
        """Send one argument-less command (PING, FLUSHALL); the first reply line, or None if
        the server does not answer. Plain RESP over a socket: no client library needed here."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                sock.sendall(b"*1\r\n$%d\r\n%s\r\n" % (len(name), name))
                reply = b""
                while not reply.endswith(b"\r\n") and len(reply) < 4096:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
                return reply.strip() or None
        except OSError:
            return None

    def flush(self) -> None:
        reply = self.command(b"FLUSHALL")
        if reply != b"+OK":
            raise RuntimeError(f"redis FLUSHALL failed: {reply!r}")

    def stop(self) -> None:
        """Stop by PID (SIGTERM); no data is kept (no persistence)."""
        if self.proc is not None:
            _stop_pid(self.proc, signal.SIGTERM)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Redis:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_postgres(parent: str | os.PathLike | None = None) -> Postgres:
    """A running PostgreSQL in a new directory under ``parent`` (default: the system temp dir,
    which the postgres user can traverse; pytest's tmp_path is private to root)."""
    return Postgres(parent)


def start_redis(parent: str | os.PathLike | None = None) -> Redis:
    return Redis(parent)


# One server of each kind per test process. pytest makes a separate session fixture for each
# module that imports one, so the servers are kept here and the fixtures hand out the same ones;
# closing is idempotent, and happens when the first of those fixtures is torn down, at the end
# of the session.
_shared: dict[str, Postgres | Redis] = {}


def _shared_server(kind: str, factory):
    if kind not in _shared:
        _shared[kind] = factory()
    return _shared[kind]


def _close_shared(kind: str) -> None:
    server = _shared.pop(kind, None)
    if server is not None:
        server.close()


def open_store(kind: str, tmp_path, request):
    """A migrated engine on a new SQLite file (``kind`` "sqlite") or PostgreSQL database."""
    from proxy_app import migrate
    from proxy_app.store import make_engine

    if kind == "sqlite":
        engine = make_engine(None, {"STATE_DIRECTORY": str(tmp_path)})
    else:
        engine = make_engine(request.getfixturevalue("pg_url"), {})
    migrate.upgrade(engine)
    return engine


@pytest.fixture(params=["sqlite", "postgresql"])
def store_engine(request, tmp_path):
    """A migrated engine, once on SQLite and once on PostgreSQL."""
    engine = open_store(request.param, tmp_path, request)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def postgres():
    yield _shared_server("postgres", start_postgres)
    _close_shared("postgres")


@pytest.fixture(scope="session")
def redis_server():
    yield _shared_server("redis", start_redis)
    _close_shared("redis")


@pytest.fixture
def pg_url(postgres):
    """The URL (postgresql://) of a new, empty database on the shared server; dropped after the test."""
    postgres.start()  # a previous test may have left it stopped
    url = postgres.new_database()
    yield url
    postgres.start()
    with contextlib.suppress(psycopg.Error):  # the drop frees disk; a failure only costs that
        postgres.drop_database(url)


@pytest.fixture
def redis_url(redis_server):
    """The URL (redis://) of the shared Redis server, flushed before the test."""
    redis_server.start()
    redis_server.flush()
    return redis_server.url


def in_processes(target, args_per_process: list[tuple], timeout: float = 60.0) -> list:
    """Run ``target(*args)`` in one forked process per args tuple, all released at the same moment
    (a barrier); return their results in order, or raise AssertionError with a child's traceback.

    Bounded: the children get ``timeout`` seconds in all and are killed after it. A child makes its
    own engines and clients (a pooled connection must not cross a fork).
    """
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    barrier = context.Barrier(len(args_per_process))

    def child(index: int, args: tuple) -> None:
        try:
            barrier.wait(timeout=timeout)
            results.put((index, True, target(*args)))
        except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
            results.put((index, False, traceback.format_exc()))

    processes = [context.Process(target=child, args=(i, args), daemon=True) for i, args in enumerate(args_per_process)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    outcomes = {}
    try:
        while len(outcomes) < len(processes):
            try:
                index, ok, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{len(processes) - len(outcomes)} of {len(processes)} processes did not finish in {timeout:g} s") from None
            if not ok:
                raise AssertionError(f"process {index} failed:\n{value}")
            outcomes[index] = value
    finally:
        for process in processes:
            process.join(timeout=max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
    return [outcomes[i] for i in range(len(processes))]
