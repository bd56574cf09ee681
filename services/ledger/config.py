from functools import lru_cache

from services.kit.config import KuSettings


class LedgerSettings(KuSettings):
    # Welcome credit for each new user (milli-Ku): 50 Ku.
    welcome_credits_milli: int = 50_000
    # Group commit: at most this many operations per database transaction, and this
    # many transactions in flight at once (each holds one connection).
    batch_max_ops: int = 64
    batch_max_inflight: int = 3
    write_pool_size: int = 6
    # Razorpay (billing/). Empty key or secret: billing answers 503 instead of guessing.
    razorpay_key_id: str = ""
    razorpay_key_secret: str = ""
    razorpay_webhook_secret: str = ""
    razorpay_base_url: str = "https://api.razorpay.com"
    razorpay_timeout_seconds: float = 15.0
    # How far back `ku billing reconcile` looks for captured payments.
    billing_reconcile_hours: int = 72


@lru_cache
def get_settings() -> LedgerSettings:
    return LedgerSettings()
