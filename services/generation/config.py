"""Settings of the generation service. Providers and the model catalog are configuration
(JSON in the environment), so a deployment swaps DeepInfra for vLLM, Ollama or
OpenRouter without code."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic import Field

from services.kit.config import KuSettings

DEEPINFRA_URL = "https://api.deepinfra.com/v1/openai"


class GenerationSettings(KuSettings):
    # OpenAI-compatible providers by name: {"name": {"base_url": ..., "api_key": ...}}.
    # `api_key` may be left out and given as KU_GENERATION_API_KEY (the default
    # provider's secret, from the environment, never from this JSON in a file).
    generation_providers: dict[str, dict[str, Any]] = {"deepinfra": {"base_url": DEEPINFRA_URL}}
    generation_api_key: str = ""
    # The catalog: a JSON list of models (see services/generation/catalog.py); empty
    # means the seed's models on the `deepinfra` provider.
    generation_models: list[dict[str, Any]] = []
    # Route every model to the built-in `offline` provider (development and demos only;
    # every result says `offline: true`; refused when KU_ENVIRONMENT=production).
    generation_offline: bool = False
    # Seed 003: a provider call that sends nothing for this long is abandoned.
    generation_timeout_seconds: float = 60.0
    # Retries of one model on 429/5xx/connection errors, with exponential backoff.
    generation_retries: int = 2
    generation_backoff_seconds: float = 0.5
    # Breaker per provider, shared through Redis by every process.
    generation_breaker_failures: int = 5
    generation_breaker_open_seconds: float = 30.0
    # A provider's stream is read at most once per this many ms once text has come (the
    # first words at once): the tokens that arrived meanwhile are read, parsed and
    # written to the client as one chunk. Fewer, larger reads and writes for every
    # hop; 0 reads and writes each token as it comes.
    generation_stream_flush_ms: int = Field(default=20, ge=0, le=1000)
    # Connections for the generations' rows (services/generation/records.py), opened
    # as needed and kept: two single statements per generation.
    generation_records_pool_size: int = Field(default=8, ge=1, le=100)
    # A hold outlives any generation; if this process dies the ledger expires it.
    generation_hold_ttl_seconds: int = 900
    # Stories hold every chapter up front; a story resumed later than this is failed.
    generation_story_hold_ttl_seconds: int = 6 * 3600
    # A story's runner renews its lease; another process takes over an expired one.
    generation_story_lease_seconds: float = 30.0


@lru_cache
def get_settings() -> GenerationSettings:
    return GenerationSettings()
