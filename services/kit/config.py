"""Settings shared by every process. Each service extends `KuSettings`."""

from __future__ import annotations

from functools import lru_cache

from pydantic_settings import BaseSettings, SettingsConfigDict


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
    # Signs the principal header the gateway forwards. Must be set outside development.
    internal_secret: str = ""
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

    def require_internal_secret(self) -> str:
        if not self.internal_secret:
            raise RuntimeError(
                "KU_INTERNAL_SECRET is not set: services cannot verify the gateway's principal"
            )
        return self.internal_secret


@lru_cache
def get_settings() -> KuSettings:
    return KuSettings()
