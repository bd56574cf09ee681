"""Settings shared by every process. Each service extends `KuSettings`."""

from __future__ import annotations

from functools import lru_cache

from pydantic_settings import BaseSettings, SettingsConfigDict

GATEWAY_NAME = "gateway"


class KuSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KU_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    environment: str = "development"
    # Empty means "use the embedded servers under .ku/" (see services.kit.embedded).
    database_url: str = ""
    redis_url: str = ""
    # Namespace for Redis keys and streams, so parallel test runs never share a bus.
    bus_prefix: str = "ku"
    # Internal principals (services.kit.principal): every process's Ed25519 public key,
    # `name:base64url,...` (the same everywhere), and this process's own private key(s).
    # `ku up` generates both in development; `ku principal-keys` prints a set for production.
    principal_keys: str = ""
    principal_signing_keys: str = ""
    log_level: str = "INFO"
    log_json: bool = True
    db_pool_size: int = 10
    db_max_overflow: int = 5

    host: str = "127.0.0.1"
    gateway_port: int = 8000
    auth_port: int = 8001
    ledger_port: int = 8002
    workspace_port: int = 8003
    generation_port: int = 8004
    enhancement_port: int = 8005

    auth_url: str = ""
    ledger_url: str = ""
    workspace_url: str = ""
    generation_url: str = ""
    enhancement_url: str = ""

    def service_url(self, name: str) -> str:
        explicit = getattr(self, f"{name}_url", "")
        if explicit:
            return explicit.rstrip("/")
        return f"http://{self.host}:{getattr(self, f'{name}_port')}"

    def require_principal_keys(self, name: str) -> None:
        """A process cannot start without the keyring, nor without its own signing key."""
        from services.kit.principal import parse_keys

        if GATEWAY_NAME not in parse_keys(self.principal_keys):
            raise RuntimeError(
                "KU_PRINCIPAL_KEYS is not set (or lacks the gateway's key): this process "
                "cannot verify internal principals (`ku principal-keys` makes a set)"
            )
        if name not in parse_keys(self.principal_signing_keys):
            raise RuntimeError(
                f"KU_PRINCIPAL_SIGNING_KEYS holds no key for {name!r}: this process "
                "cannot sign its calls to other services"
            )


@lru_cache
def get_settings() -> KuSettings:
    return KuSettings()
