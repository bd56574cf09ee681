"""Shared infrastructure for every Ku service: settings, database, bus, errors,
principal, idempotency, health, metrics, logging and the app factory.

No business rules live here.
"""
