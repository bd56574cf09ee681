"""`ku`: the command line for running and operating Ku.

    ku up                 run every service, the worker and the gateway locally
    ku migrate            apply every service's migrations
    ku ledger verify      check the ledger's invariants (exit 1 on any breach)

Services add their own commands in `services/<name>/cli.py` (`register(subparsers)`).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Callable

from services.kit.migrations import SERVICE_ORDER

Command = Callable[[argparse.Namespace], int]


def _urls() -> None:
    """Fill KU_DATABASE_URL / KU_REDIS_URL from the embedded servers when unset."""
    from services.kit import embedded

    embedded.ensure_urls()


def cmd_migrate(args: argparse.Namespace) -> int:
    from services.kit.migrations import upgrade_all

    _urls()
    done = upgrade_all(os.environ["KU_DATABASE_URL"])
    print(f"migrated: {', '.join(done)}", file=sys.stderr)
    return 0


def cmd_ledger_verify(args: argparse.Namespace) -> int:
    from services.kit.db import plain_url
    from services.ledger.verify import verify

    _urls()
    problems = asyncio.run(verify(plain_url(os.environ["KU_DATABASE_URL"])))
    if problems:
        print("ledger verify: FAILED", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print("ledger verify: all invariants hold", file=sys.stderr)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from services.kit.runner import run_suite

    return run_suite(only=args.only)


def cmd_principal_keys(args: argparse.Namespace) -> int:
    """A fresh set of principal keys for production, as .env lines (stdout only)."""
    from services.kit.principal import GATEWAY, format_keys, generate_keypair

    names = [*SERVICE_ORDER, GATEWAY]
    pairs = {name: generate_keypair() for name in names}
    print(f"KU_PRINCIPAL_KEYS={format_keys({n: pub for n, (_, pub) in pairs.items()})}")
    for name in names:
        print(f"KU_PRINCIPAL_SIGNING_KEY_{name.upper()}={name}:{pairs[name][0]}")
    # The worker runs every service's jobs, which call others as those services.
    worker = {n: priv for n, (priv, _) in pairs.items() if n != GATEWAY}
    print(f"KU_PRINCIPAL_SIGNING_KEY_WORKER={format_keys(worker)}")
    print("(one private key per container; never give a service the gateway's)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ku", description="Run and operate Ku.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="migrate, then run every service, the worker and the gateway")
    up.add_argument("--only", nargs="*", help="run only these processes (e.g. ledger gateway)")
    up.set_defaults(func=cmd_up)

    migrate = sub.add_parser("migrate", help="apply every service's migrations")
    migrate.set_defaults(func=cmd_migrate)

    keys = sub.add_parser(
        "principal-keys", help="print a fresh set of internal principal keys (.env lines)"
    )
    keys.set_defaults(func=cmd_principal_keys)

    ledger = sub.add_parser("ledger", help="ledger operations")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True)
    verify = ledger_sub.add_parser("verify", help="check every ledger invariant")
    verify.set_defaults(func=cmd_ledger_verify)

    for service in SERVICE_ORDER:
        try:
            module = importlib.import_module(f"services.{service}.cli")
        except ModuleNotFoundError:
            continue
        module.register(sub, _urls)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Command = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
