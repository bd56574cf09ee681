"""`ku billing ...`: payment operations (auto-discovered by services/cli.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any


def register(subparsers: Any, ensure_urls: Callable[[], None]) -> None:
    billing = subparsers.add_parser("billing", help="payments (Razorpay)")
    billing_sub = billing.add_subparsers(dest="billing_command", required=True)

    reconcile = billing_sub.add_parser(
        "reconcile", help="grant captured Razorpay payments that were never granted"
    )
    reconcile.add_argument(
        "--hours", type=int, default=None, help="look back this many hours (default 72)"
    )

    def cmd_reconcile(args: argparse.Namespace) -> int:
        from services.kit.errors import KuError
        from services.ledger.billing.tasks import reconcile as run

        ensure_urls()
        try:
            counts = asyncio.run(run(lookback_hours=args.hours))
        except KuError as exc:
            print(f"billing reconcile: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
        print(json.dumps(counts, sort_keys=True))
        if counts.get("errors"):
            print(f"billing reconcile: {counts['errors']} payment(s) failed", file=sys.stderr)
            return 1
        return 0

    reconcile.set_defaults(func=cmd_reconcile)
