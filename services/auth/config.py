from functools import lru_cache

from services.kit.config import KuSettings

# Users read their money and never move it directly: they spend through generation and
# enhancement, which hold and capture in their own lane (docs/ledger.md, authority).
DEFAULT_USER_SCOPES = "ledger:read workspace:read workspace:write generate enhance"


class AuthSettings(KuSettings):
    # --- Ku access tokens (what this service issues) ---
    # KU_AUTH_PRIVATE_KEY: PEM of the RSA (-> RS256) or EC P-256 (-> ES256) signing key.
    # Required outside development/test; there, when unset, one key is generated and kept
    # in auth.signing_keys so every auth process signs with the same key.
    auth_private_key: str = ""
    # KU_AUTH_KEY_ID: the `kid` of KU_AUTH_PRIVATE_KEY; default: its RFC 7638 thumbprint.
    auth_key_id: str = ""
    # KU_AUTH_TOKEN_ISSUER / KU_AUTH_TOKEN_AUDIENCE: `iss` and `aud` of Ku access tokens
    # (the gateway checks both).
    auth_token_issuer: str = "ku-auth"
    auth_token_audience: str = "ku"
    # KU_AUTH_ACCESS_TOKEN_TTL_SECONDS: lifetime of an access token (15 min).
    auth_access_token_ttl_seconds: int = 900
    # KU_AUTH_REFRESH_TOKEN_TTL_SECONDS: lifetime of a refresh token (30 days); each use
    # rotates it.
    auth_refresh_token_ttl_seconds: int = 30 * 86_400
    # KU_AUTH_USER_SCOPES: space-separated scopes of a user's access token.
    auth_user_scopes: str = DEFAULT_USER_SCOPES

    # --- SSO: the main site's JWT, exchanged at POST /v1/auth/sso ---
    # KU_SSO_ALGORITHMS: comma-separated allow-list (HS256/384/512, RS256/384/512,
    # ES256/384). `none` is never accepted, whatever this says.
    sso_algorithms: str = "HS256,RS256"
    # KU_SSO_HS256_SECRET: shared secret for HS* tokens (HS* is refused when empty).
    sso_hs256_secret: str = ""
    # KU_SSO_JWKS_URL: where the main site publishes its public keys (RS*/ES* tokens).
    sso_jwks_url: str = ""
    # KU_SSO_JWKS: the same as inline JSON ({"keys": [...]}); wins over the URL.
    sso_jwks: str = ""
    # KU_SSO_JWKS_CACHE_SECONDS: how long a fetched JWKS is trusted before refetching.
    sso_jwks_cache_seconds: int = 300
    # KU_SSO_ISSUER / KU_SSO_AUDIENCE: required `iss` / `aud` of SSO tokens. Checked
    # when set; both must be set in production.
    sso_issuer: str = ""
    sso_audience: str = ""
    # KU_SSO_LEEWAY_SECONDS: clock skew allowed on exp/nbf/iat.
    sso_leeway_seconds: int = 30

    # --- API keys ---
    # KU_AUTH_KEY_TOUCH_SECONDS: last_used_at is written at most this often per key.
    auth_key_touch_seconds: int = 60

    @property
    def user_scopes(self) -> list[str]:
        return self.auth_user_scopes.split()

    @property
    def sso_algorithm_list(self) -> list[str]:
        return [a.strip() for a in self.sso_algorithms.split(",") if a.strip()]

    @property
    def is_production(self) -> bool:
        return self.environment not in ("development", "test")


@lru_cache
def get_settings() -> AuthSettings:
    return AuthSettings()
