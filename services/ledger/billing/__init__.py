"""Payments: a catalog of top-ups and plans, Razorpay orders, checkout verification,
webhooks, subscriptions, refunds and reconciliation. Credits move only through the
ledger's own operations (`grant`, `clawback`), keyed by payment or refund id, so a
captured payment grants exactly once whichever path (checkout verify, webhook,
reconciliation) gets there first, and however often each of them runs."""
