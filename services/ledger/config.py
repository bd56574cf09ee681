from functools import lru_cache

from services.kit.config import KuSettings


class LedgerSettings(KuSettings):
    # Welcome credit for each new user (milli-Ku): 50 Ku.
    welcome_credits_milli: int = 50_000
    # Group commit: at most this many operations per database transaction, and this
    # many transactions in flight at once (each holds one connection).
    batch_max_ops: int = 64
    batch_max_inflight: int = 6
    write_pool_size: int = 8
    default_hold_ttl_seconds: int = 900
    max_hold_ttl_seconds: int = 86_400


@lru_cache
def get_settings() -> LedgerSettings:
    return LedgerSettings()
