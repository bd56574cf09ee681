"""A typed Python client for Ku's native API (sync and async, over httpx).

    from ku_client import KuClient, InsufficientCredits

    with KuClient("https://ku.example", api_key="ku_...") as ku:
        hold = ku.reserve(user_id, 12_500, reference="job-42")   # 12.5 Ku, in milli-Ku
        try:
            ...  # run the job
        except Exception:
            ku.release(hold.hold.id)
            raise
        ku.capture(hold.hold.id, 9_000)

Amounts are integer milli-Ku. Money-moving calls carry an `Idempotency-Key` generated
once per call and reused on every retry; 429/502/503/504 and dropped connections are
retried with backoff honouring `Retry-After`. Errors are typed (`_exceptions`).
"""

from ku_client._batch import BatchItem, BatchItemResult, BatchResult
from ku_client._client import AsyncKuClient, KuClient
from ku_client._core import RetryPolicy, new_idempotency_key
from ku_client._exceptions import (
    AuthenticationFailed,
    BadRequest,
    Conflict,
    ConnectionFailed,
    InsufficientCredits,
    KuError,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    StorageFull,
    UnsupportedContent,
    ValidationFailed,
)
from ku_client._models import (
    Balance,
    Charge,
    EnhancementTask,
    Estimate,
    Event,
    Generation,
    Hold,
    HoldResult,
    Model,
    Page,
    Project,
    Transaction,
    to_ku,
    to_milli,
)

__all__ = [
    "AsyncKuClient",
    "AuthenticationFailed",
    "BadRequest",
    "Balance",
    "BatchItem",
    "BatchItemResult",
    "BatchResult",
    "Charge",
    "Conflict",
    "ConnectionFailed",
    "EnhancementTask",
    "Estimate",
    "Event",
    "Generation",
    "Hold",
    "HoldResult",
    "InsufficientCredits",
    "KuClient",
    "KuError",
    "Model",
    "NotFound",
    "Page",
    "PermissionDenied",
    "Project",
    "RateLimited",
    "RetryPolicy",
    "ServerError",
    "ServiceUnavailable",
    "StorageFull",
    "Transaction",
    "UnsupportedContent",
    "ValidationFailed",
    "new_idempotency_key",
    "to_ku",
    "to_milli",
]
