"""The auth service: users, apps and API keys, SSO exchange and Ku access tokens."""
