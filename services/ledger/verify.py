"""`ku ledger verify`: check every invariant of the ledger; any breach is listed."""

from __future__ import annotations

import asyncpg

CHECKS: list[tuple[str, str]] = [
    (
        "transactions whose postings do not sum to zero",
        "SELECT tx_id FROM ledger.postings GROUP BY tx_id HAVING SUM(amount_milli) <> 0",
    ),
    (
        "transactions with no postings (other than zero-amount ones)",
        "SELECT t.id FROM ledger.transactions t WHERE t.amount_milli <> 0"
        " AND NOT EXISTS (SELECT 1 FROM ledger.postings p WHERE p.tx_id = t.id)",
    ),
    (
        "wallets whose balance differs from their grants' remaining",
        "SELECT w.user_id FROM ledger.wallets w LEFT JOIN (SELECT user_id,"
        " SUM(remaining_milli) AS s FROM ledger.grants GROUP BY user_id) g USING (user_id)"
        " WHERE w.balance_milli <> COALESCE(g.s, 0)",
    ),
    (
        "wallets whose balance differs from their wallet postings",
        "SELECT w.user_id FROM ledger.wallets w LEFT JOIN (SELECT owner,"
        " SUM(amount_milli) AS s FROM ledger.postings WHERE account = 'wallet' GROUP BY owner) p"
        " ON p.owner = w.user_id WHERE w.balance_milli <> COALESCE(p.s, 0)",
    ),
    (
        "wallets whose held amount differs from their active holds",
        "SELECT w.user_id FROM ledger.wallets w LEFT JOIN (SELECT user_id,"
        " SUM(amount_milli) AS s FROM ledger.holds WHERE status = 'active' GROUP BY user_id) h"
        " USING (user_id) WHERE w.held_milli <> COALESCE(h.s, 0)",
    ),
    (
        "wallets whose held amount differs from their held postings",
        "SELECT w.user_id FROM ledger.wallets w LEFT JOIN (SELECT owner,"
        " SUM(amount_milli) AS s FROM ledger.postings WHERE account = 'held' GROUP BY owner) p"
        " ON p.owner = w.user_id WHERE w.held_milli <> COALESCE(p.s, 0)",
    ),
    (
        "negative wallets or grants",
        "SELECT user_id FROM ledger.wallets WHERE balance_milli < 0 OR held_milli < 0"
        " UNION ALL SELECT user_id FROM ledger.grants"
        " WHERE remaining_milli < 0 OR remaining_milli > amount_milli",
    ),
    (
        "holds resolved more than once, or resolved without a journal entry",
        "SELECT h.id::text FROM ledger.holds h LEFT JOIN ledger.transactions t"
        " ON t.hold_id = h.id AND t.kind IN ('capture', 'release', 'hold_expiry')"
        " GROUP BY h.id, h.status HAVING COUNT(t.id) > 1"
        " OR (h.status <> 'active') <> (COUNT(t.id) = 1)",
    ),
    (
        "holds whose allocations differ from their amount",
        "SELECT h.id::text FROM ledger.holds h LEFT JOIN ledger.hold_allocations a"
        " ON a.hold_id = h.id GROUP BY h.id"
        " HAVING h.amount_milli <> COALESCE(SUM(a.amount_milli), 0)",
    ),
    (
        "charges refunded beyond what they charged",
        "SELECT t.id FROM ledger.transactions t JOIN ledger.transactions r ON r.refund_of = t.id"
        " GROUP BY t.id HAVING SUM(r.amount_milli) > (SELECT COALESCE(SUM(p.amount_milli), 0)"
        " FROM ledger.postings p WHERE p.tx_id = t.id AND p.account = 'spend')",
    ),
    # Billing (sql/ledger_v2_billing.sql): debt from clawbacks is a `debt` account.
    (
        "wallets whose debt differs from their debt postings",
        "SELECT w.user_id FROM ledger.wallets w LEFT JOIN (SELECT owner,"
        " SUM(amount_milli) AS s FROM ledger.postings WHERE account = 'debt' GROUP BY owner) p"
        " ON p.owner = w.user_id WHERE w.debt_milli <> -COALESCE(p.s, 0)",
    ),
    (
        "negative debts",
        "SELECT user_id FROM ledger.wallets WHERE debt_milli < 0",
    ),
]


async def verify(dsn: str) -> list[str]:
    """Every breached invariant, with up to 5 offending ids each; empty when sound."""
    conn = await asyncpg.connect(dsn)
    problems = []
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            for name, sql in CHECKS:
                rows = await conn.fetch(f"SELECT * FROM ({sql}) q LIMIT 5")
                if rows:
                    ids = ", ".join(str(r[0]) for r in rows)
                    problems.append(f"{name}: {ids}")
    finally:
        await conn.close()
    return problems
