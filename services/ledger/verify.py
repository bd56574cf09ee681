"""`ku ledger verify`: check every invariant of the ledger; each breached check is
named, with up to 5 offending ids.

Each check is a query returning the ids that break it. They run in one
repeatable-read snapshot, so a busy ledger is checked at one instant.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg


@dataclass(frozen=True)
class Check:
    name: str
    description: str
    sql: str


# Per lot: where every milli-Ku a grant issued is now.
_LOT_ACCOUNTED = """
SELECT g.id FROM ledger.grants g
  LEFT JOIN (SELECT grant_id, SUM(amount_milli - returned_milli) AS s
               FROM ledger.draws GROUP BY grant_id) d ON d.grant_id = g.id
  LEFT JOIN (SELECT ha.grant_id, SUM(ha.amount_milli) AS s FROM ledger.hold_allocations ha
               JOIN ledger.holds h ON h.id = ha.hold_id AND h.status = 'active'
              GROUP BY ha.grant_id) a ON a.grant_id = g.id
 WHERE g.amount_milli <> g.remaining_milli + COALESCE(d.s, 0) + COALESCE(a.s, 0)
                         + g.expired_milli + g.clawed_milli + g.settled_milli + g.legacy_milli
"""

_RESOLVE_KIND = (
    "CASE h.status WHEN 'captured' THEN 'capture' WHEN 'released' THEN 'release'"
    " WHEN 'expired' THEN 'hold_expiry' WHEN 'clawed' THEN 'clawback' END"
)

CHECKS: list[Check] = [
    Check(
        "postings_balanced",
        "transactions whose postings do not sum to zero",
        "SELECT tx_id FROM ledger.postings GROUP BY tx_id HAVING SUM(amount_milli) <> 0",
    ),
    Check(
        "journal_complete",
        "transactions with no postings (other than zero-amount ones)",
        "SELECT t.id FROM ledger.transactions t WHERE t.amount_milli <> 0"
        " AND NOT EXISTS (SELECT 1 FROM ledger.postings p WHERE p.tx_id = t.id)",
    ),
    Check(
        "wallet_balance_lots",
        "wallets whose balance differs from their grants' remaining",
        "SELECT w.user_id FROM ledger.wallets w LEFT JOIN (SELECT user_id,"
        " SUM(remaining_milli) AS s FROM ledger.grants GROUP BY user_id) g USING (user_id)"
        " WHERE w.balance_milli <> COALESCE(g.s, 0)",
    ),
    Check(
        "wallet_balance_journal",
        "wallets whose balance differs from their wallet postings",
        "SELECT w.user_id FROM ledger.wallets w LEFT JOIN (SELECT owner,"
        " SUM(amount_milli) AS s FROM ledger.postings WHERE account = 'wallet' GROUP BY owner) p"
        " ON p.owner = w.user_id WHERE w.balance_milli <> COALESCE(p.s, 0)",
    ),
    Check(
        "wallet_held_holds",
        "wallets whose held amount differs from their active holds",
        "SELECT w.user_id FROM ledger.wallets w LEFT JOIN (SELECT user_id,"
        " SUM(amount_milli - clawed_milli) AS s FROM ledger.holds WHERE status = 'active'"
        " GROUP BY user_id) h USING (user_id) WHERE w.held_milli <> COALESCE(h.s, 0)",
    ),
    Check(
        "wallet_held_journal",
        "wallets whose held amount differs from their held postings",
        "SELECT w.user_id FROM ledger.wallets w LEFT JOIN (SELECT owner,"
        " SUM(amount_milli) AS s FROM ledger.postings WHERE account = 'held' GROUP BY owner) p"
        " ON p.owner = w.user_id WHERE w.held_milli <> COALESCE(p.s, 0)",
    ),
    Check(
        "wallet_debt_journal",
        "wallets whose debt differs from their debt postings",
        "SELECT w.user_id FROM ledger.wallets w LEFT JOIN (SELECT owner,"
        " SUM(amount_milli) AS s FROM ledger.postings WHERE account = 'debt' GROUP BY owner) p"
        " ON p.owner = w.user_id WHERE w.debt_milli <> -COALESCE(p.s, 0)",
    ),
    Check(
        "not_negative",
        "negative wallets, debts or lots",
        "SELECT user_id FROM ledger.wallets"
        " WHERE balance_milli < 0 OR held_milli < 0 OR debt_milli < 0"
        " UNION ALL SELECT user_id FROM ledger.grants"
        " WHERE remaining_milli < 0 OR remaining_milli > amount_milli OR expired_milli < 0"
        " OR clawed_milli < 0 OR settled_milli < 0 OR legacy_milli < 0",
    ),
    Check(
        "lot_conservation",
        "lots whose amount differs from remaining + drawn + held + expired + clawed"
        " + settled (+ legacy)",
        _LOT_ACCOUNTED,
    ),
    Check(
        "records_linked",
        "postings or draws whose transaction, or draws whose lot, does not exist (no foreign"
        " keys since migration 0005: the ledger's functions write them with their parents)",
        "SELECT 'posting ' || p.id FROM ledger.postings p"
        " WHERE NOT EXISTS (SELECT 1 FROM ledger.transactions t WHERE t.id = p.tx_id)"
        " UNION ALL SELECT 'draw ' || d.tx_id || '/' || d.grant_id FROM ledger.draws d"
        " WHERE NOT EXISTS (SELECT 1 FROM ledger.transactions t WHERE t.id = d.tx_id)"
        " OR NOT EXISTS (SELECT 1 FROM ledger.grants g WHERE g.id = d.grant_id)",
    ),
    Check(
        "lot_same_user",
        "hold allocations or charge draws from a lot of another user",
        "SELECT h.id::text FROM ledger.hold_allocations a JOIN ledger.holds h ON h.id = a.hold_id"
        " JOIN ledger.grants g ON g.id = a.grant_id WHERE g.user_id <> h.user_id"
        " UNION ALL SELECT t.id::text FROM ledger.draws d JOIN ledger.transactions t"
        " ON t.id = d.tx_id JOIN ledger.grants g ON g.id = d.grant_id"
        " WHERE g.user_id <> t.user_id OR t.kind NOT IN ('debit', 'capture')",
    ),
    Check(
        "charge_draws",
        "charges whose draws differ from what they spent or what refunds returned",
        "SELECT t.id FROM ledger.transactions t JOIN (SELECT tx_id, SUM(amount_milli) AS drawn,"
        " SUM(returned_milli) AS returned FROM ledger.draws GROUP BY tx_id) d ON d.tx_id = t.id"
        " WHERE d.drawn <> (SELECT COALESCE(SUM(p.amount_milli), 0) FROM ledger.postings p"
        "                    WHERE p.tx_id = t.id AND p.account = 'spend')"
        " OR d.returned <> (SELECT COALESCE(SUM(r.amount_milli), 0) FROM ledger.transactions r"
        "                    WHERE r.refund_of = t.id AND r.kind = 'refund')",
    ),
    Check(
        "hold_allocations",
        "holds whose allocations differ from what they hold",
        "SELECT h.id::text FROM ledger.holds h LEFT JOIN ledger.hold_allocations a"
        " ON a.hold_id = h.id GROUP BY h.id"
        " HAVING h.amount_milli - h.clawed_milli <> COALESCE(SUM(a.amount_milli), 0)",
    ),
    Check(
        "hold_state_journal",
        "holds whose state differs from the journal (resolved without, or more than once,"
        " or by the wrong kind of entry; captured amount differs)",
        "SELECT h.id::text FROM ledger.holds h"
        " LEFT JOIN ledger.transactions r ON r.id = h.resolve_tx_id"
        " WHERE (SELECT COUNT(*) FROM ledger.transactions t WHERE t.hold_id = h.id"
        "        AND t.kind IN ('capture', 'release', 'hold_expiry'))"
        "       > CASE WHEN h.status IN ('active', 'clawed') THEN 0 ELSE 1 END"
        f" OR (h.status <> 'active' AND (r.id IS NULL OR r.kind <> {_RESOLVE_KIND}))"
        " OR (h.status = 'active' AND h.resolve_tx_id IS NOT NULL)"
        " OR (h.status = 'captured' AND r.amount_milli <> h.captured_milli)",
    ),
    Check(
        "refunds_within_charge",
        "charges refunded beyond what they charged",
        "SELECT t.id FROM ledger.transactions t JOIN ledger.transactions r ON r.refund_of = t.id"
        " AND r.kind = 'refund'"
        " GROUP BY t.id HAVING SUM(r.amount_milli) > (SELECT COALESCE(SUM(p.amount_milli), 0)"
        " FROM ledger.postings p WHERE p.tx_id = t.id AND p.account = 'spend')",
    ),
    Check(
        "system_accounts",
        "system accounts that differ from the journal: `expired` against the lots' expired"
        " credit, `issuance:<source>` against grants minus clawbacks",
        "SELECT 'expired' WHERE (SELECT COALESCE(SUM(amount_milli), 0) FROM ledger.postings"
        "  WHERE account = 'expired') <> (SELECT COALESCE(SUM(expired_milli), 0)"
        "  FROM ledger.grants)"
        " UNION ALL SELECT 'issuance:' || s.source FROM ("
        "  SELECT owner AS source, -SUM(amount_milli) AS issued FROM ledger.postings"
        "   WHERE account = 'issuance' GROUP BY owner) s"
        " FULL JOIN (SELECT g.source, SUM(g.amount_milli) AS granted FROM ledger.grants g"
        "   JOIN ledger.transactions t ON t.id = g.tx_id AND t.kind = 'grant'"
        "   GROUP BY g.source) g ON g.source = s.source"
        " LEFT JOIN (SELECT source, SUM(amount_milli) AS clawed FROM ledger.transactions"
        "   WHERE kind = 'clawback' GROUP BY source) c ON c.source = COALESCE(s.source, g.source)"
        " WHERE COALESCE(s.issued, 0) <> COALESCE(g.granted, 0) - COALESCE(c.clawed, 0)",
    ),
    Check(
        "one_grant_per_payment",
        "payments (billing references) granted more than once",
        "SELECT reference FROM ledger.transactions WHERE kind = 'grant' AND app = 'billing'"
        " AND reference IS NOT NULL GROUP BY user_id, reference HAVING COUNT(*) > 1",
    ),
    Check(
        "clawbacks_within_grant",
        "grants clawed back beyond what they granted",
        "SELECT g.id FROM ledger.transactions g JOIN ledger.transactions c ON c.refund_of = g.id"
        " AND c.kind = 'clawback' GROUP BY g.id, g.amount_milli"
        " HAVING SUM(c.amount_milli) > g.amount_milli",
    ),
    Check(
        "stale_active_holds",
        "active holds more than an hour past their TTL (the expiry job is not running)",
        "SELECT id::text FROM ledger.holds WHERE status = 'active'"
        " AND expires_at < clock_timestamp() - interval '1 hour'",
    ),
    Check(
        "credit_beside_debt",
        "users with spendable credit while they owe a debt",
        "SELECT w.user_id FROM ledger.wallets w WHERE w.debt_milli > 0 AND EXISTS ("
        " SELECT 1 FROM ledger.grants g WHERE g.user_id = w.user_id AND g.spendable"
        " AND (g.expires_at IS NULL OR g.expires_at > clock_timestamp()))",
    ),
    # --- allowances (units, not Ku: docs/ledger.md "Allowances") ---
    Check(
        "allowance_used_within_granted",
        "allowances with used units below 0 or above what was granted",
        "SELECT user_id || '/' || kind || '/' || period FROM ledger.allowances"
        " WHERE granted < 0 OR used < 0 OR used > granted",
    ),
    Check(
        "allowance_entries",
        "allowances whose entries do not sum to their granted and used units (or entries"
        " of no allowance)",
        "SELECT COALESCE(a.user_id, e.user_id) || '/' || COALESCE(a.kind, e.kind) || '/'"
        " || COALESCE(a.period, e.period) FROM ledger.allowances a"
        " FULL JOIN (SELECT user_id, kind, period, SUM(granted_delta) AS granted,"
        "  SUM(used_delta) AS used FROM ledger.allowance_entries"
        "  GROUP BY user_id, kind, period) e"
        " ON (e.user_id, e.kind, e.period) = (a.user_id, a.kind, a.period)"
        " WHERE a.user_id IS NULL OR COALESCE(e.granted, 0) <> a.granted"
        " OR COALESCE(e.used, 0) <> a.used",
    ),
    Check(
        "allowance_draws",
        "draws whose entries differ from their state (one draw entry; confirmed, returned"
        " or expired exactly once, by the entry of its kind; an active or confirmed draw"
        " holds its unit), or draw entries of no draw",
        "SELECT d.reference FROM ledger.allowance_draws d LEFT JOIN (SELECT reference,"
        "  COUNT(*) FILTER (WHERE entry = 'draw') AS draws,"
        "  COUNT(*) FILTER (WHERE entry = 'confirm') AS confirms,"
        "  COUNT(*) FILTER (WHERE entry = 'return') AS returns,"
        "  COUNT(*) FILTER (WHERE entry = 'expiry') AS expiries,"
        "  SUM(used_delta) AS used"
        "  FROM ledger.allowance_entries WHERE entry <> 'grant' GROUP BY reference) e"
        " ON e.reference = d.reference"
        " WHERE e.reference IS NULL OR e.draws <> 1 OR e.used NOT IN (0, 1)"
        " OR e.confirms <> (d.status = 'confirmed')::int"
        " OR e.returns <> (d.status = 'returned')::int"
        " OR e.expiries <> (d.status = 'expired')::int"
        " OR (d.status IN ('active', 'confirmed') AND e.used <> 1)"
        " OR EXISTS (SELECT 1 FROM ledger.allowance_entries x WHERE x.reference = d.reference"
        "  AND x.entry <> 'grant'"
        "  AND (x.user_id, x.kind, x.period) <> (d.user_id, d.kind, d.period))"
        " UNION ALL SELECT x.reference FROM ledger.allowance_entries x"
        " WHERE x.entry <> 'grant' AND NOT EXISTS (SELECT 1 FROM ledger.allowance_draws d"
        "  WHERE d.reference = x.reference)",
    ),
    Check(
        "stale_active_draws",
        "active allowance draws more than an hour past their TTL (the expiry sweep is not running)",
        "SELECT reference FROM ledger.allowance_draws WHERE status = 'active'"
        " AND expires_at < clock_timestamp() - interval '1 hour'",
    ),
]


async def run_checks(conn: asyncpg.Connection) -> list[str]:
    """Run every check on `conn` (in the caller's transaction); one line per breach."""
    problems = []
    for check in CHECKS:
        rows = await conn.fetch(f"SELECT * FROM ({check.sql}) q LIMIT 5")
        if rows:
            ids = ", ".join(str(r[0]) for r in rows)
            problems.append(f"{check.name}: {check.description}: {ids}")
    return problems


async def verify(dsn: str) -> list[str]:
    """Every breached invariant, by check name; empty when sound."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            return await run_checks(conn)
    finally:
        await conn.close()
