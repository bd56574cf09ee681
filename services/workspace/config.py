from functools import lru_cache

from services.kit.config import KuSettings


class WorkspaceSettings(KuSettings):
    # Every user's storage across all apps, unless an admin sets a per-user limit.
    default_quota_bytes: int = 1_048_576
    # Serialized JSON size of a project's metadata.
    max_metadata_bytes: int = 16_384
    # Largest content one request may carry (characters of text or base64), checked
    # before decoding so a huge payload costs nothing; the quota is the real bound.
    max_content_chars: int = 12_000_000


@lru_cache
def get_settings() -> WorkspaceSettings:
    return WorkspaceSettings()
