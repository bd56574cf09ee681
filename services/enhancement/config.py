"""Enhancement settings (env prefix KU_). Prices are milli-Ku; pool amounts are milli
provider credits (what the platform pre-bought from each provider)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, model_validator

from services.kit.config import KuSettings

ENHANCEMENT_TYPES = ("lighting", "style", "background", "mood", "custom")
REMOTE_PROVIDERS = ("nanobanana", "fal", "kie", "google")


class EnhancementSettings(KuSettings):
    # Price of one enhancement by type, in milli-Ku (KU_ENHANCEMENT_PRICES='{"lighting": 2000}').
    enhancement_prices: dict[str, int] = Field(
        default_factory=lambda: {
            "lighting": 2000,
            "style": 2000,
            "background": 3000,
            "mood": 2000,
            "custom": 3000,
        }
    )
    # Images above this many pixels cost `large_percent` % of the price.
    enhancement_large_pixels: int = 4_000_000
    enhancement_large_percent: int = 150
    # What a degraded (local Pillow) result costs the user, milli-Ku; 0 releases the hold.
    enhancement_degraded_price_milli: int = 0
    # Enhancements included per month by tier; beyond them the price is charged in Ku.
    enhancement_tier_allowances: dict[str, int] = Field(
        default_factory=lambda: {"free": 0, "plus": 10, "pro": 25}
    )
    # The tier each billing plan (catalog item) gives while it is paid; other plans, none.
    enhancement_plan_tiers: dict[str, str] = Field(
        default_factory=lambda: {
            "lite_monthly": "plus",
            "lite_yearly": "plus",
            "pro_monthly": "pro",
            "pro_yearly": "pro",
            "studio_monthly": "pro",
            "studio_yearly": "pro",
        }
    )
    # The app lane a hold is booked in when the caller names none (the ledger's `app`).
    enhancement_default_app: str = "imagegene"

    # Input fetching (SSRF-safe): size cap, timeout, redirects, pixel limit.
    enhancement_max_input_bytes: int = 10 * 1024 * 1024
    enhancement_fetch_timeout_seconds: float = 10.0
    enhancement_max_redirects: int = 3
    enhancement_max_pixels: int = 40_000_000
    # Development and tests only: exact origins (http://127.0.0.1:9001) exempt from the
    # private-address rule, e.g. fake providers on loopback. Empty in production.
    enhancement_fetch_allow_origins: str = ""

    # Task lifecycle.
    enhancement_task_deadline_seconds: int = 600
    # A worker owns a task for this long and renews it while it works; a task whose lease
    # ran out (worker killed) is picked up again by the pending-tasks job.
    enhancement_lease_seconds: int = 60
    enhancement_poll_interval_seconds: float = 2.0
    # Schedule of the pending-tasks job (seed 004: every 2 minutes).
    enhancement_pending_every_seconds: int = 120
    enhancement_hold_ttl_seconds: int = 3600

    # Results (and inputs): "local" (a directory shared by the service and the worker)
    # or "s3" (an S3-compatible bucket; see storage.py).
    enhancement_storage: Literal["local", "s3"] = "local"
    enhancement_storage_dir: str = ".ku/enhancement"
    enhancement_s3_bucket: str = ""
    # Keys are `<prefix>/inputs/<task>` and `<prefix>/results/<task>`.
    enhancement_s3_prefix: str = ""
    # Empty: AWS S3 for the region; e.g. http://minio:9000 for MinIO.
    enhancement_s3_endpoint_url: str = ""
    enhancement_s3_region: str = "us-east-1"
    # Empty: botocore's credential chain (AWS_* environment, profile, instance role).
    enhancement_s3_access_key_id: str = ""
    enhancement_s3_secret_access_key: str = ""
    # auto | path | virtual ("path" for MinIO and most self-hosted servers).
    enhancement_s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    enhancement_result_url_seconds: int = 3600
    enhancement_retention_days: int = 30

    # Providers, tried in order of health, then cost. A provider with no URL is off.
    enhancement_nanobanana_url: str = ""
    enhancement_nanobanana_api_key: str = ""
    enhancement_nanobanana_cost_milli: int = 20_000
    enhancement_fal_url: str = ""
    enhancement_fal_api_key: str = ""
    enhancement_fal_cost_milli: int = 39_000
    enhancement_kie_url: str = ""
    enhancement_kie_api_key: str = ""
    enhancement_kie_cost_milli: int = 20_000
    enhancement_google_url: str = ""
    enhancement_google_api_key: str = ""
    enhancement_google_cost_milli: int = 39_000
    enhancement_provider_timeout_seconds: float = 30.0
    enhancement_breaker_failures: int = 3
    enhancement_breaker_open_seconds: float = 30.0

    # Platform pools: alert below this many credits or this % of the last refill level.
    enhancement_pool_low_milli: int = 100_000
    enhancement_pool_low_percent: int = 20
    # Share of the month's revenue (billing's payments) that funds the pools (seed 004: 80 %).
    enhancement_pool_budget_percent: int = 80

    # Seed 004's BACKGROUND_JOB_TOKEN: lets a plain cron call POST /api/background/process-tasks
    # (`Authorization: Bearer <token>`). Empty: that route is refused.
    enhancement_process_token: str = ""

    # Users past this % of their monthly allowance get one alert per month.
    enhancement_allowance_alert_percent: int = 90

    @model_validator(mode="after")
    def _plans_name_known_tiers(self) -> EnhancementSettings:
        unknown = set(self.enhancement_plan_tiers.values()) - set(self.enhancement_tier_allowances)
        if unknown:
            raise ValueError(
                f"KU_ENHANCEMENT_PLAN_TIERS names tiers that KU_ENHANCEMENT_TIER_ALLOWANCES"
                f" does not have: {sorted(unknown)}"
            )
        return self

    def provider_cost(self, name: str) -> int:
        # A pool of a provider this build does not know (renamed, removed) costs nothing.
        return int(getattr(self, f"enhancement_{name}_cost_milli", 0))

    def allowed_origins(self) -> frozenset[str]:
        return frozenset(
            o.strip().rstrip("/")
            for o in self.enhancement_fetch_allow_origins.split(",")
            if o.strip()
        )


@lru_cache
def get_settings() -> EnhancementSettings:
    return EnhancementSettings()
