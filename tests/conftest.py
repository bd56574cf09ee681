"""Shared fixtures. The `ku` pytest plugin (services/kit/testing/plugin.py) prepares the
database, Redis prefix and internal secret for the whole run."""
