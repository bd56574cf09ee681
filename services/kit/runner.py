"""`ku up`: migrate, then run every service, the worker and the gateway as separate processes.

`Suite` is the programmatic form, for end-to-end tests and benches:

    with Suite(only=["ledger", "worker"], free_ports=True) as suite:
        httpx.get(suite.urls["ledger"] + "/ready")

It fills `KU_DATABASE_URL` / `KU_REDIS_URL` from embedded servers when unset, makes
throwaway principal keys outside production (each child gets only its own private
key: see services.kit.principal), migrates, starts each process in
its own session (so a Ctrl-C reaches only us and we stop them in order), waits for
`GET /ready` on each (and checks that `GET /health` on its port names it), and
streams their output prefixed with their names. When any process dies, `wait()`
returns and everything is stopped: SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from services.kit.config import KuSettings
from services.kit.migrations import SERVICE_ORDER
from services.kit.principal import format_keys, generate_keypair, parse_keys

ROOT = Path(__file__).resolve().parents[2]
SERVICES_DIR = ROOT / "services"
GATEWAY_APP = ROOT / "gateway" / "app.py"
WORKER = "worker"
GATEWAY = "gateway"
# The worker has no KuSettings port field; services/worker.py reads KU_WORKER_PORT.
DEFAULT_WORKER_PORT = 8009
TAIL_LINES = 40
COLOURS = ("36", "32", "35", "33", "34", "96", "92", "95")


class SuiteError(RuntimeError):
    """A process could not be started, or did not become ready."""


@dataclass
class ProcessSpec:
    name: str
    argv: list[str]
    port: int
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"


@dataclass
class _Child:
    spec: ProcessSpec
    proc: subprocess.Popen[bytes]
    tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=TAIL_LINES)
    )
    pump: threading.Thread | None = None


def existing_services() -> list[str]:
    """Services with an app (`services/<name>/app.py`), in SERVICE_ORDER."""
    return [s for s in SERVICE_ORDER if (SERVICES_DIR / s / "app.py").exists()]


def available_processes() -> list[str]:
    """Every process `ku up` can run here: services, the worker, the gateway."""
    names = [*existing_services(), WORKER]
    if GATEWAY_APP.exists():
        names.append(GATEWAY)
    return names


# Every port free_port() has handed out in this process. The kernel may give a port it
# just released to the next bind(0): two services of one suite then got the same port,
# one died at bind (uvicorn's exit code 3) while the other answered its `GET /ready`.
_HANDED_OUT: set[int] = set()
_HANDED_OUT_LOCK = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, and one this process has not been given before."""
    with _HANDED_OUT_LOCK:
        for _ in range(1000):
            with socket.socket() as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port
    raise SuiteError(f"no port left on {host} that this process was not given already")


class _ChildSettings(KuSettings):
    """KuSettings read from a given mapping (and `.env`), not from this process's environment."""

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: Any, init_settings: Any, env_settings: Any, dotenv_settings: Any,
        file_secret_settings: Any,
    ) -> tuple[Any, ...]:  # fmt: skip
        return (init_settings, dotenv_settings)


def _settings_from(env: Mapping[str, str]) -> KuSettings:
    """KuSettings as a child would see them with `env` (plus `.env` for what env lacks)."""
    values = {
        key[3:].lower(): value
        for key, value in env.items()
        if key.startswith("KU_") and key[3:].lower() in KuSettings.model_fields
    }
    return _ChildSettings(**values)  # type: ignore[arg-type]


# uvicorn's httptools protocol writing a response's head and body in one send
# (services/kit/http.py); compose and the image name it too (tests/test_deploy.py).
HTTP_PROTOCOL = "services.kit.http:HttpProtocol"
# uvicorn would otherwise rewrite a loopback peer's address from its X-Forwarded-For
# before the gateway's own rule (KU_GATEWAY_TRUST_FORWARDED, gateway/access.py) sees
# it: any local client could pick the address its per-IP rate limit counts against.
NO_PROXY_HEADERS = "--no-proxy-headers"


def _uvicorn(target: str, host: str, port: int, processes: int = 1) -> list[str]:
    argv = [
        sys.executable, "-m", "uvicorn", target, "--factory",
        "--host", host, "--port", str(port), "--no-access-log", "--http", HTTP_PROTOCOL,
        NO_PROXY_HEADERS,
    ]  # fmt: skip
    if processes > 1:
        # uvicorn's supervisor forks N workers sharing the one listening socket; each has
        # its own event loop, pools and group committer (Postgres's row locks decide).
        argv += ["--workers", str(processes)]
    return argv


def _processes(env: dict[str, str], name: str) -> int:
    """KU_<NAME>_PROCESSES: how many processes serve `name` (default 1)."""
    raw = env.get(f"KU_{name.upper()}_PROCESSES") or "1"
    try:
        count = int(raw)
    except ValueError:
        raise SuiteError(
            f"KU_{name.upper()}_PROCESSES must be a whole number, not {raw!r}"
        ) from None
    if count < 1:
        raise SuiteError(f"KU_{name.upper()}_PROCESSES must be at least 1")
    return count


def _upgrade(database_url: str) -> list[str]:
    from services.kit.migrations import upgrade_all

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return upgrade_all(database_url)
    # Alembic's env uses asyncio.run(): inside an event loop, migrate from another thread.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(upgrade_all, database_url).result()


def _get(url: str, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
    """A bare GET on loopback (no proxies, no client library)."""
    host_port = url.split("://", 1)[1]
    host, port = host_port.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Suite:
    """Run Ku's processes; a context manager yielding itself with `urls` filled.

    env: the environment the processes start from (default: os.environ). KU_DATABASE_URL
        and KU_REDIS_URL are filled from embedded servers under `embedded_root` when
        absent (and stopped with the suite).
    only: process names (services, "worker", "gateway"); default all that exist.
    free_ports: pick free loopback ports instead of the KU_*_PORT settings (tests).
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        only: Sequence[str] | None = None,
        *,
        free_ports: bool = False,
        migrate: bool = True,
        ready_timeout: float = 60.0,
        stop_grace: float = 10.0,
        output: IO[str] | None = None,
        quiet: bool = False,
        embedded_root: Path = Path(".ku"),
    ) -> None:
        self.base_env = dict(os.environ if env is None else env)
        self.only = list(only) if only else None
        self.free_ports = free_ports
        self.migrate = migrate
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        self.output = output
        self.quiet = quiet
        self.embedded_root = embedded_root
        self.env: dict[str, str] = {}
        self.urls: dict[str, str] = {}
        self.specs: list[ProcessSpec] = []
        self.generated_secret = False
        self._children: dict[str, _Child] = {}
        self._embedded: Any = None
        self._lock = threading.Lock()
        self._stopped = False

    # -- context manager -------------------------------------------------------------

    def __enter__(self) -> Suite:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Suite:
        return await asyncio.to_thread(self.__enter__)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    # -- public API --------------------------------------------------------------------

    @property
    def processes(self) -> dict[str, subprocess.Popen[bytes]]:
        return {name: child.proc for name, child in self._children.items()}

    def logs(self, name: str) -> list[str]:
        """The last lines a process printed."""
        return list(self._children[name].tail)

    def start(self) -> None:
        self._check_names()
        self.env = self._prepare_env()
        if self.migrate:
            _upgrade(self.env["KU_DATABASE_URL"])
        self.specs = self._plan()
        self.urls = {spec.name: spec.url for spec in self.specs}
        for spec in self.specs:
            self.env[f"KU_{spec.name.upper()}_PORT"] = str(spec.port)
            self.env[f"KU_{spec.name.upper()}_URL"] = spec.url
        if self.free_ports:
            # An isolated suite must never reach a service someone else runs on the
            # default ports: services it does not run get an address nobody listens on.
            for name in SERVICE_ORDER:
                if name not in self.urls and not self.base_env.get(f"KU_{name.upper()}_URL"):
                    self.env[f"KU_{name.upper()}_URL"] = f"http://127.0.0.1:{free_port()}"
        # The gateway may read the services (e.g. their OpenAPI) when it starts.
        first = [s for s in self.specs if s.name != GATEWAY]
        later = [s for s in self.specs if s.name == GATEWAY]
        for batch in (first, later):
            for spec in batch:
                self._spawn(spec)
            self._wait_ready(batch)

    def poll(self) -> tuple[str, int] | None:
        """The first process found dead (name, exit code), or None."""
        for name, child in self._children.items():
            code = child.proc.poll()
            if code is not None:
                return name, code
        return None

    def wait(self, timeout: float | None = None) -> tuple[str, int] | None:
        """Block until one process exits; its (name, exit code), or None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            dead = self.poll()
            if dead is not None:
                return dead
            time.sleep(0.1)
        return None

    def stop(self) -> None:
        """SIGTERM every process (gateway first), SIGKILL what is left after the grace."""
        if self._stopped:
            return
        self._stopped = True
        # A second Ctrl-C must not cut the shutdown short and orphan processes.
        main = threading.current_thread() is threading.main_thread()
        saved = (
            [(s, signal.signal(s, signal.SIG_IGN)) for s in (signal.SIGINT, signal.SIGTERM)]
            if main
            else []
        )
        try:
            self._stop()
        finally:
            for sig, handler in saved:
                signal.signal(sig, handler)

    def _stop(self) -> None:
        order = sorted(self._children.values(), key=lambda c: c.spec.name != GATEWAY)
        for child in order:
            self._signal(child, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace
        for child in order:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(child, signal.SIGKILL)
                child.proc.wait()
        for child in order:
            if child.pump is not None:
                child.pump.join(2)
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None

    # -- internals -----------------------------------------------------------------------

    def _prepare_env(self) -> dict[str, str]:
        env = dict(self.base_env)
        settings = _settings_from(env)
        env["KU_DATABASE_URL"] = settings.database_url
        env["KU_REDIS_URL"] = settings.redis_url
        if not settings.database_url or not settings.redis_url:
            from services.kit.embedded import EmbeddedServers

            self._embedded = EmbeddedServers(self.embedded_root)
            if not settings.database_url:
                env["KU_DATABASE_URL"] = self._embedded.start_postgres()
            if not settings.redis_url:
                env["KU_REDIS_URL"] = self._embedded.start_redis()
        if not settings.principal_keys:
            if settings.environment == "production":
                raise SuiteError(
                    "KU_PRINCIPAL_KEYS and KU_PRINCIPAL_SIGNING_KEYS must be set when "
                    "KU_ENVIRONMENT=production (`ku principal-keys` prints a set)"
                )
            # One key pair per process for this run: every child gets the public keyring
            # and only its own private key.
            pairs = {name: generate_keypair() for name in (*SERVICE_ORDER, GATEWAY)}
            env["KU_PRINCIPAL_KEYS"] = format_keys({n: pub for n, (_, pub) in pairs.items()})
            env["KU_PRINCIPAL_SIGNING_KEYS"] = format_keys(
                {n: priv for n, (priv, _) in pairs.items()}
            )
            self.generated_secret = True
        env["PYTHONUNBUFFERED"] = "1"
        if self.only:
            # A partial suite's worker runs only the jobs of the services that run.
            env.setdefault(
                "KU_WORKER_SERVICES", ",".join(n for n in self.only if n in SERVICE_ORDER)
            )
        return env

    def _check_names(self) -> None:
        available = available_processes()
        unknown = [n for n in self.only or () if n not in available]
        if unknown:
            raise SuiteError(
                f"unknown or missing process(es): {', '.join(unknown)} "
                f"(available here: {', '.join(available)})"
            )

    def _plan(self) -> list[ProcessSpec]:
        available = available_processes()
        names = self.only or available
        settings = _settings_from(self.env)
        host = settings.host or "127.0.0.1"
        specs = []
        for name in available:  # fixed order: services, worker, gateway
            if name not in names:
                continue
            if self.free_ports:
                port = free_port()
            elif name == WORKER:
                port = int(self.env.get("KU_WORKER_PORT") or DEFAULT_WORKER_PORT)
            else:
                port = int(getattr(settings, f"{name}_port"))
            if name == WORKER:
                argv = [sys.executable, "-m", "services.worker"]
            elif name == GATEWAY:
                # One gateway process: it serves its metrics on its own second port.
                argv = _uvicorn("gateway.app:create_app", host, port)
            else:
                argv = _uvicorn(
                    f"services.{name}.app:create_app", host, port, _processes(self.env, name)
                )
            specs.append(ProcessSpec(name=name, argv=argv, port=port, host=host))
        return specs

    def _out(self) -> IO[str] | None:
        if self.quiet:
            return None
        return self.output if self.output is not None else sys.stdout

    def _child_env(self, name: str) -> dict[str, str]:
        """The suite's environment with only this process's own signing key(s)."""
        env = dict(self.env)
        held = parse_keys(env.get("KU_PRINCIPAL_SIGNING_KEYS", ""))
        if name == WORKER:
            # The worker runs services' jobs, which call other services as those services.
            wanted = [
                s.strip()
                for s in (env.get("KU_WORKER_SERVICES") or ",".join(SERVICE_ORDER)).split(",")
            ]
        else:
            wanted = [name]
        env["KU_PRINCIPAL_SIGNING_KEYS"] = format_keys(
            {n: k for n, k in held.items() if n in wanted}
        )
        if name == GATEWAY and self.free_ports:
            env["KU_GATEWAY_METRICS_PORT"] = str(free_port())
        return env

    def _spawn(self, spec: ProcessSpec) -> None:
        proc = subprocess.Popen(
            spec.argv,
            env=self._child_env(spec.name),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        child = _Child(spec=spec, proc=proc)
        self._children[spec.name] = child
        child.pump = threading.Thread(
            target=self._pump, args=(child,), name=f"ku-{spec.name}-log", daemon=True
        )
        child.pump.start()

    def _prefix(self, name: str) -> str:
        width = max((len(s.name) for s in self.specs), default=len(name))
        label = f"{name:<{width}} |"
        out = self._out()
        colour = (
            out is not None
            and hasattr(out, "isatty")
            and out.isatty()
            and not os.environ.get("NO_COLOR")
        )
        if colour:
            index = [s.name for s in self.specs].index(name) if name in self.urls else 0
            return f"\x1b[{COLOURS[index % len(COLOURS)]}m{label}\x1b[0m "
        return label + " "

    def _pump(self, child: _Child) -> None:
        assert child.proc.stdout is not None
        prefix = self._prefix(child.spec.name)
        for raw in iter(child.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            child.tail.append(line)
            out = self._out()
            if out is not None:
                with self._lock:
                    try:
                        out.write(prefix + line + "\n")
                        out.flush()
                    except (ValueError, OSError):  # output closed under us (e.g. a pipe)
                        pass
        child.proc.stdout.close()

    def _wait_ready(self, specs: Sequence[ProcessSpec]) -> None:
        deadline = time.monotonic() + self.ready_timeout
        pending = list(specs)
        while pending:
            for spec in list(pending):
                child = self._children[spec.name]
                code = child.proc.poll()
                if code is not None:
                    raise SuiteError(
                        f"{spec.name} exited with code {code} before it was ready"
                        + self._tail_text(child)
                    )
                try:
                    status, _ = _get(spec.url, "/ready")
                except OSError:
                    continue
                if status == 200 and self._is_ours(spec):
                    pending.remove(spec)
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(s.name for s in pending)
                tails = "".join(self._tail_text(self._children[s.name]) for s in pending)
                raise SuiteError(
                    f"{names} did not answer GET /ready with 200 within "
                    f"{self.ready_timeout:.0f} s" + tails
                )
            time.sleep(0.1)

    def _is_ours(self, spec: ProcessSpec) -> bool:
        """Whether the process that answered `GET /ready` on `spec`'s port is `spec`'s:
        every process names itself in `GET /health`. Another one on that port (a port
        handed out twice) would pass for it while ours dies at bind: a SuiteError. No
        answer (a timeout): not known yet, asked again on the next round."""
        try:
            _, body = _get(spec.url, "/health")
        except OSError:
            return False
        try:
            service = json.loads(body).get("service")
        except (ValueError, AttributeError):
            service = None
        if service != spec.name:
            raise SuiteError(
                f"{spec.name}'s port {spec.port} is answered by {service or 'something else'}"
                f" (another process holds it)" + self._tail_text(self._children[spec.name])
            )
        return True

    def _tail_text(self, child: _Child) -> str:
        if child.pump is not None:
            child.pump.join(0.5)  # let the last lines of a dead process arrive
        lines = list(child.tail)[-15:]
        if not lines:
            return f"\n  ({child.spec.name} printed nothing)"
        return f"\n  last lines of {child.spec.name}:\n" + "\n".join(
            "    " + line for line in lines
        )

    @staticmethod
    def _signal(child: _Child, sig: signal.Signals) -> None:
        try:
            os.killpg(child.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def banner(self) -> str:
        lines = ["Ku is up:"]
        width = max(len(s.name) for s in self.specs)
        ordered = sorted(self.specs, key=lambda s: s.name != GATEWAY)
        for spec in ordered:
            if spec.name == WORKER:
                lines.append(f"  {spec.name:<{width}}  {spec.url}/health")
            else:
                lines.append(f"  {spec.name:<{width}}  {spec.url}  (docs: {spec.url}/docs)")
        if self.generated_secret:
            lines.append(
                "  (KU_PRINCIPAL_KEYS unset: generated a key pair per process for this run)"
            )
        lines.append("Ctrl-C stops everything.")
        return "\n".join(lines)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_suite(only: list[str] | None) -> int:
    """`ku up`: run until Ctrl-C/SIGTERM (exit 0) or until a process dies (exit non-zero)."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    suite = Suite(only=only)
    try:
        with suite:
            print(suite.banner(), flush=True)
            try:
                name, code = suite.wait() or ("?", 1)
            except KeyboardInterrupt:
                print("ku up: stopping", file=sys.stderr, flush=True)
                return 0
            print(
                f"ku up: {name} exited with code {code}; stopping everything",
                file=sys.stderr,
                flush=True,
            )
            return code if code > 0 else 1
    except KeyboardInterrupt:  # during startup
        print("ku up: interrupted", file=sys.stderr, flush=True)
        return 130
    except SuiteError as exc:
        print(f"ku up: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
