-- Ledger v3 (migration 0004): the way back mirrors the way out, debt, authority.
--
-- Installed by migration 0004 after 0002_ledger.sql and 0003_billing.sql. Every
-- function below is stated in full; a function not redefined here keeps its body
-- from the newest earlier file (`_err`, `_journal`, `_append_only` from 0002). This
-- file never changes once released: a later rule is a new migration with its own file
-- (tests/ledger/test_sql_immutable.py pins the old files and compares a migrated
-- database with the newest definitions in the tree).
--
-- Rules added here (docs/ledger.md has the table):
-- * Per-lot records both ways. `_draw` writes one `draws` row per lot a debit or a
--   capture spent; `hold_allocations` say what a hold holds. A refund, a release or the
--   unspent rest of a capture goes back to those lots through `_give_back`: a part whose
--   lot has expired goes to `expired`, never to a new lot; a valid part settles debt
--   first, then becomes the lot's remaining again.
-- * Debt. Nothing is spendable while `wallets.debt_milli` > 0 (`_available`); every
--   credit that comes back (grant, refund, release) settles it first.
-- * Clawbacks (billing refunds) name the payment's lot (`grant_reference`) and take at
--   most what that payment granted minus what expired and what earlier clawbacks took:
--   the lot's remaining, then active holds drawn from it (they shrink and a
--   `hold.changed` event tells their owner), then the spent part from other spendable
--   credit, then debt.
-- * Expiry is decided with clock_timestamp(), the instant of the decision (now() is the
--   start of the transaction, which lags by the time a batch has waited).
-- * Authority: `op.auth` is required; SQL checks whose money (user), whose holds and
--   whose charges inside the transaction that moves it. Deny by default.
-- * Idempotency: the first outcome, success or business failure, is stored with the
--   request's hash under every key the request carries (header key and natural key);
--   another request under either key is 409, forever.
-- * `apply_batch` runs each operation in its own subtransaction: a raised error becomes
--   that operation's error result, its neighbours commit.
--
-- Per-lot conservation (checked by `ku ledger verify`), for every grant:
--   amount = remaining + (drawn - returned) + active held + expired + clawed + settled
--            + legacy
-- `legacy_milli` is what the lot had given out before per-lot records existed
-- (backfilled by migration 0004).

-- Spendable now: unexpired grants' remaining, and nothing at all while a debt is
-- outstanding. Expired credit is never spendable, swept or not. PL/pgSQL, not SQL:
-- its plans are cached per session (a SQL function is planned at every call).
CREATE OR REPLACE FUNCTION ledger._available(p_user text)
RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  v_debt bigint;
  v_sum bigint;
BEGIN
  SELECT debt_milli INTO v_debt FROM ledger.wallets WHERE user_id = p_user;
  IF COALESCE(v_debt, 0) > 0 THEN
    RETURN 0;
  END IF;
  SELECT COALESCE(SUM(remaining_milli), 0)::bigint INTO v_sum FROM ledger.grants
   WHERE user_id = p_user AND remaining_milli > 0
     AND (expires_at IS NULL OR expires_at > clock_timestamp());
  RETURN v_sum;
END $$;

-- Emit credits.changed for the user; `p_available` when the caller already knows it.
CREATE OR REPLACE FUNCTION ledger._changed(p_user text, p_delta bigint, p_reason text,
                                           p_app text, p_tx bigint,
                                           p_available bigint DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_available bigint := COALESCE(p_available, ledger._available(p_user));
  w record;
BEGIN
  SELECT held_milli, debt_milli INTO w FROM ledger.wallets WHERE user_id = p_user;
  INSERT INTO ledger.outbox (id, topic, payload)
  VALUES (gen_random_uuid(), 'credits.changed',
          jsonb_build_object('user_id', p_user, 'available_milli', v_available,
                             'held_milli', w.held_milli, 'debt_milli', w.debt_milli,
                             'delta_milli', p_delta, 'reason', p_reason,
                             'app', p_app, 'transaction_id', p_tx));
  RETURN jsonb_build_object('available_milli', v_available, 'held_milli', w.held_milli,
                            'debt_milli', w.debt_milli);
END $$;

-- Take p_amount from the user's spendable grants, soonest-expiring first, then by
-- priority, then oldest, and record where it came from: a hold's allocations
-- (p_hold) or a charge's draws (p_tx), one row per lot touched. The caller has
-- checked availability under the wallet lock.
CREATE OR REPLACE FUNCTION ledger._draw(p_user text, p_amount bigint, p_hold uuid,
                                        p_tx bigint)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  g record;
  v_left bigint := p_amount;
  v_take bigint;
BEGIN
  FOR g IN
    SELECT id, remaining_milli FROM ledger.grants
     WHERE user_id = p_user AND remaining_milli > 0
       AND (expires_at IS NULL OR expires_at > clock_timestamp())
     ORDER BY expires_at ASC NULLS LAST, priority DESC, id ASC
     FOR UPDATE
  LOOP
    v_take := least(g.remaining_milli, v_left);
    UPDATE ledger.grants SET remaining_milli = remaining_milli - v_take WHERE id = g.id;
    IF p_hold IS NOT NULL THEN
      INSERT INTO ledger.hold_allocations (hold_id, grant_id, amount_milli)
      VALUES (p_hold, g.id, v_take);
    ELSE
      INSERT INTO ledger.draws (tx_id, grant_id, amount_milli) VALUES (p_tx, g.id, v_take);
    END IF;
    v_left := v_left - v_take;
    EXIT WHEN v_left = 0;
  END LOOP;
  IF v_left > 0 THEN
    RAISE EXCEPTION 'ledger._draw: % milli-Ku short for user %', v_left, p_user;
  END IF;
END $$;

-- Credit coming back to lot p_grant (a refund, a release, the rest of a capture).
-- Decided now: if the lot has expired, the part goes to `expired`; otherwise it
-- settles the user's debt first and the rest is the lot's remaining again. Updates
-- the lot and the wallet's debt; the caller updates the balance and journals.
-- Returns {to_wallet, settled, expired}.
CREATE OR REPLACE FUNCTION ledger._give_back(p_user text, p_grant bigint, p_amount bigint)
RETURNS bigint[] LANGUAGE plpgsql AS $$
DECLARE
  v_expires timestamptz;
  v_debt bigint;
  v_settle bigint;
BEGIN
  IF p_amount = 0 THEN
    RETURN ARRAY[0, 0, 0]::bigint[];
  END IF;
  SELECT expires_at INTO v_expires FROM ledger.grants WHERE id = p_grant FOR UPDATE;
  IF v_expires IS NOT NULL AND v_expires <= clock_timestamp() THEN
    UPDATE ledger.grants SET expired_milli = expired_milli + p_amount WHERE id = p_grant;
    RETURN ARRAY[0, 0, p_amount]::bigint[];
  END IF;
  SELECT debt_milli INTO v_debt FROM ledger.wallets WHERE user_id = p_user;
  v_settle := least(p_amount, v_debt);
  UPDATE ledger.grants
     SET remaining_milli = remaining_milli + p_amount - v_settle,
         settled_milli = settled_milli + v_settle
   WHERE id = p_grant;
  IF v_settle > 0 THEN
    UPDATE ledger.wallets SET debt_milli = debt_milli - v_settle WHERE user_id = p_user;
  END IF;
  RETURN ARRAY[p_amount - v_settle, v_settle, 0]::bigint[];
END $$;

CREATE OR REPLACE FUNCTION ledger._hold_json(p_hold uuid)
RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
BEGIN
  RETURN (SELECT jsonb_build_object('id', id, 'user_id', user_id, 'app', app, 'owner', owner,
                                    'amount_milli', amount_milli,
                                    'captured_milli', captured_milli,
                                    'clawed_milli', clawed_milli, 'status', status,
                                    'reference', reference, 'description', description,
                                    'expires_at', expires_at, 'created_at', created_at,
                                    'resolved_at', resolved_at)
            FROM ledger.holds WHERE id = p_hold);
END $$;

-- Resolve a locked active hold: spend p_capture from its allocations whose lots are
-- still valid (soonest-expiring first, as a debit would), give the rest back to its
-- lots (an expired lot's part expires), and journal it. The caller has checked that
-- p_capture fits in the hold's valid part.
CREATE OR REPLACE FUNCTION ledger._resolve_hold(p_hold uuid, p_capture bigint, p_status text,
                                                p_kind text)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  h ledger.holds%ROWTYPE;
  a record;
  v_now timestamptz := clock_timestamp();
  v_active bigint;
  v_left bigint := p_capture;
  v_spend bigint;
  v_part bigint[];
  v_back bigint := 0;
  v_settled bigint := 0;
  v_grants bigint[] := '{}';
  v_spent bigint[] := '{}';
  v_accounts text[];
  v_owners text[];
  v_amounts bigint[];
  v_tx bigint;
BEGIN
  SELECT * INTO h FROM ledger.holds WHERE id = p_hold FOR UPDATE;
  v_active := h.amount_milli - h.clawed_milli;
  v_accounts := ARRAY['held', 'spend'];
  v_owners := ARRAY[h.user_id, h.app];
  v_amounts := ARRAY[-v_active, p_capture];
  FOR a IN
    SELECT ha.grant_id, ha.amount_milli, g.source,
           (g.expires_at IS NOT NULL AND g.expires_at <= v_now) AS lapsed
      FROM ledger.hold_allocations ha JOIN ledger.grants g ON g.id = ha.grant_id
     WHERE ha.hold_id = p_hold AND ha.amount_milli > 0
     ORDER BY (g.expires_at IS NOT NULL AND g.expires_at <= v_now) ASC,
              g.expires_at ASC NULLS LAST, g.priority DESC, g.id ASC
  LOOP
    v_spend := CASE WHEN a.lapsed THEN 0 ELSE least(a.amount_milli, v_left) END;
    IF v_spend > 0 THEN
      v_grants := v_grants || a.grant_id;
      v_spent := v_spent || v_spend;
      v_left := v_left - v_spend;
    END IF;
    v_part := ledger._give_back(h.user_id, a.grant_id, a.amount_milli - v_spend);
    v_back := v_back + v_part[1];
    v_settled := v_settled + v_part[2];
    IF v_part[3] > 0 THEN
      v_accounts := v_accounts || 'expired'::text;
      v_owners := v_owners || a.source;
      v_amounts := v_amounts || v_part[3];
    END IF;
  END LOOP;
  IF v_left > 0 THEN
    RAISE EXCEPTION 'ledger._resolve_hold: % milli-Ku of hold % not capturable', v_left, p_hold;
  END IF;
  v_accounts := v_accounts || ARRAY['wallet', 'debt'];
  v_owners := v_owners || ARRAY[h.user_id, h.user_id];
  v_amounts := v_amounts || ARRAY[v_back, v_settled];
  UPDATE ledger.wallets
     SET balance_milli = balance_milli + v_back, held_milli = held_milli - v_active,
         updated_at = now()
   WHERE user_id = h.user_id;
  v_tx := ledger._journal(p_kind, h.user_id, h.app, NULL, v_back, p_capture,
                          h.description, h.reference, h.id, NULL,
                          v_accounts, v_owners, v_amounts);
  INSERT INTO ledger.draws (tx_id, grant_id, amount_milli)
  SELECT v_tx, gid, amt FROM unnest(v_grants, v_spent) AS t(gid, amt);
  UPDATE ledger.holds
     SET status = p_status, captured_milli = p_capture, resolved_at = now(), resolve_tx_id = v_tx
   WHERE id = p_hold;
  PERFORM ledger._changed(h.user_id, v_back, p_kind, h.app, v_tx);
  RETURN v_tx;
END $$;

-- An unresolved hold expires by itself: every operation on a user first releases
-- that user's holds whose TTL has passed (the job does it for idle users).
CREATE OR REPLACE FUNCTION ledger._sweep_holds(p_user text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  v_hold uuid;
BEGIN
  FOR v_hold IN
    SELECT id FROM ledger.holds
     WHERE user_id = p_user AND status = 'active' AND expires_at <= clock_timestamp()
     ORDER BY id
  LOOP
    PERFORM ledger._resolve_hold(v_hold, 0, 'expired', 'hold_expiry');
  END LOOP;
END $$;

-- A grant first settles the user's debt; the grant row keeps its full amount, what
-- settled the debt in `settled_milli` and what is left as its remaining.
CREATE OR REPLACE FUNCTION ledger._op_grant(op jsonb, p_user text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_amount bigint := (op->>'amount')::bigint;
  v_source text := op->>'source';
  v_expires timestamptz := (op->>'expires_at')::timestamptz;
  v_debt bigint;
  v_settle bigint;
  v_tx bigint;
  v_grant bigint;
  v_bal jsonb;
BEGIN
  IF v_expires IS NOT NULL AND v_expires <= clock_timestamp() THEN
    RETURN ledger._err(422, 'already_expired', 'expires_at is in the past');
  END IF;
  SELECT debt_milli INTO v_debt FROM ledger.wallets WHERE user_id = p_user;
  v_settle := least(v_amount, COALESCE(v_debt, 0));
  v_tx := ledger._journal('grant', p_user, op->>'app', v_source, v_amount - v_settle, v_amount,
                          op->>'description', op->>'reference', NULL, NULL,
                          ARRAY['issuance', 'wallet', 'debt'], ARRAY[v_source, p_user, p_user],
                          ARRAY[-v_amount, v_amount - v_settle, v_settle]);
  INSERT INTO ledger.grants (user_id, source, amount_milli, remaining_milli, settled_milli,
                             priority, expires_at, reference, tx_id)
  VALUES (p_user, v_source, v_amount, v_amount - v_settle, v_settle,
          COALESCE((op->>'priority')::int, 0), v_expires, op->>'reference', v_tx)
  RETURNING id INTO v_grant;
  UPDATE ledger.wallets
     SET balance_milli = balance_milli + v_amount - v_settle,
         debt_milli = debt_milli - v_settle, updated_at = now()
   WHERE user_id = p_user;
  v_bal := ledger._changed(p_user, v_amount - v_settle, 'grant:' || v_source, op->>'app', v_tx);
  RETURN jsonb_build_object('status', 201, 'body', jsonb_build_object(
    'grant_id', v_grant, 'transaction_id', v_tx, 'user_id', p_user, 'source', v_source,
    'amount_milli', v_amount, 'expires_at', v_expires, 'reference', op->>'reference',
    'debt_settled_milli', v_settle, 'created_at', now()) || v_bal);
END $$;

CREATE OR REPLACE FUNCTION ledger._op_debit(op jsonb, p_user text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_amount bigint := (op->>'amount')::bigint;
  v_app text := op->>'app';
  v_available bigint := ledger._available(p_user);
  v_tx bigint;
  v_bal jsonb;
BEGIN
  IF v_amount IS NULL OR v_amount <= 0 OR v_app IS NULL THEN
    RETURN ledger._err(422, 'invalid_debit', 'A debit needs a positive amount and an app');
  END IF;
  IF v_available < v_amount THEN
    RETURN ledger._err(402, 'insufficient_credits', 'Insufficient credits',
                       jsonb_build_object('available_milli', v_available,
                                          'required_milli', v_amount));
  END IF;
  v_tx := ledger._journal('debit', p_user, v_app, NULL, -v_amount, v_amount,
                          op->>'description', op->>'reference', NULL, NULL,
                          ARRAY['wallet', 'spend'], ARRAY[p_user, v_app],
                          ARRAY[-v_amount, v_amount]);
  PERFORM ledger._draw(p_user, v_amount, NULL, v_tx);
  UPDATE ledger.wallets SET balance_milli = balance_milli - v_amount, updated_at = now()
   WHERE user_id = p_user;
  v_bal := ledger._changed(p_user, -v_amount, 'debit', v_app, v_tx, v_available - v_amount);
  RETURN jsonb_build_object('status', 201, 'body', jsonb_build_object(
    'transaction_id', v_tx, 'user_id', p_user, 'app', v_app, 'amount_milli', v_amount,
    'description', op->>'description', 'reference', op->>'reference',
    'created_at', now()) || v_bal);
END $$;

CREATE OR REPLACE FUNCTION ledger._op_reserve(op jsonb, p_user text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_amount bigint := (op->>'amount')::bigint;
  v_app text := op->>'app';
  v_owner text := op->'auth'->>'owner';
  v_available bigint := ledger._available(p_user);
  v_hold uuid := gen_random_uuid();
  v_tx bigint;
  v_bal jsonb;
BEGIN
  IF v_owner IS NULL THEN
    RETURN ledger._err(403, 'forbidden', 'A hold needs an owner in its authority');
  END IF;
  IF v_amount IS NULL OR v_amount <= 0 OR v_app IS NULL THEN
    RETURN ledger._err(422, 'invalid_hold', 'A hold needs a positive amount and an app');
  END IF;
  IF v_available < v_amount THEN
    RETURN ledger._err(402, 'insufficient_credits', 'Insufficient credits',
                       jsonb_build_object('available_milli', v_available,
                                          'required_milli', v_amount));
  END IF;
  v_tx := ledger._journal('reserve', p_user, v_app, NULL, -v_amount, v_amount,
                          op->>'description', op->>'reference', v_hold, NULL,
                          ARRAY['wallet', 'held'], ARRAY[p_user, p_user],
                          ARRAY[-v_amount, v_amount]);
  INSERT INTO ledger.holds (id, user_id, app, owner, amount_milli, reference, description,
                            expires_at, reserve_tx_id)
  VALUES (v_hold, p_user, v_app, v_owner, v_amount, op->>'reference', op->>'description',
          clock_timestamp() + make_interval(secs => (op->>'ttl_seconds')::int), v_tx);
  PERFORM ledger._draw(p_user, v_amount, v_hold, NULL);
  UPDATE ledger.wallets
     SET balance_milli = balance_milli - v_amount, held_milli = held_milli + v_amount,
         updated_at = now()
   WHERE user_id = p_user;
  v_bal := ledger._changed(p_user, -v_amount, 'reserve', v_app, v_tx,
                           v_available - v_amount);
  RETURN jsonb_build_object('status', 201, 'body',
    jsonb_build_object('hold', ledger._hold_json(v_hold), 'transaction_id', v_tx) || v_bal);
END $$;

-- Capture or release. A capture spends only allocations whose lots are still valid at
-- this instant: asking for more than that is 409 `hold_partly_expired` (detail
-- `capturable_milli`) and leaves the hold active, so the owner may capture what is
-- capturable or release it; the lapsed part expires when the hold resolves.
CREATE OR REPLACE FUNCTION ledger._op_resolve(op jsonb, p_user text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_kind text := op->>'op';
  v_hold uuid := (op->>'hold_id')::uuid;
  v_may text := op->'auth'->>'holds';
  h ledger.holds%ROWTYPE;
  v_capture bigint;
  v_valid bigint;
  v_tx bigint;
BEGIN
  SELECT * INTO h FROM ledger.holds WHERE id = v_hold FOR UPDATE;
  IF v_may IS NULL THEN
    RETURN ledger._err(403, 'forbidden', 'No authority over holds');
  END IF;
  IF v_may <> '*' AND v_may <> h.owner THEN
    RETURN ledger._err(403, 'not_your_hold', 'This hold belongs to someone else');
  END IF;
  IF h.status <> 'active' THEN
    -- Resolved before: the same resolution replays its outcome, any other is refused.
    IF h.status = 'expired' AND v_kind = 'capture' THEN
      RETURN ledger._err(409, 'hold_expired', 'The hold expired before it was captured',
                         jsonb_build_object('hold', ledger._hold_json(v_hold)));
    END IF;
    IF (v_kind = 'capture' AND h.status = 'captured'
        AND (op->>'amount' IS NULL OR (op->>'amount')::bigint = h.captured_milli))
       OR (v_kind = 'release' AND h.status IN ('released', 'expired')) THEN
      RETURN jsonb_build_object('status', 200, 'replayed', true, 'body',
        jsonb_build_object('hold', ledger._hold_json(v_hold), 'transaction_id', h.resolve_tx_id,
                           'available_milli', ledger._available(p_user),
                           'held_milli', (SELECT held_milli FROM ledger.wallets
                                          WHERE user_id = p_user)));
    END IF;
    RETURN ledger._err(409, 'hold_already_' || h.status,
                       'The hold was already ' || h.status,
                       jsonb_build_object('hold', ledger._hold_json(v_hold)));
  END IF;
  IF v_kind = 'capture' THEN
    v_capture := COALESCE((op->>'amount')::bigint, h.amount_milli - h.clawed_milli);
    IF v_capture > h.amount_milli - h.clawed_milli THEN
      RETURN ledger._err(422, 'capture_exceeds_hold', 'Cannot capture more than is held',
                         jsonb_build_object('held_milli', h.amount_milli - h.clawed_milli,
                                            'requested_milli', v_capture));
    END IF;
    SELECT COALESCE(SUM(ha.amount_milli), 0) INTO v_valid
      FROM ledger.hold_allocations ha JOIN ledger.grants g ON g.id = ha.grant_id
     WHERE ha.hold_id = v_hold
       AND (g.expires_at IS NULL OR g.expires_at > clock_timestamp());
    IF v_capture > v_valid THEN
      RETURN ledger._err(409, 'hold_partly_expired',
                         'Part of the credit in this hold expired; capture at most the rest',
                         jsonb_build_object('capturable_milli', v_valid,
                                            'requested_milli', v_capture));
    END IF;
    v_tx := ledger._resolve_hold(v_hold, v_capture, 'captured', 'capture');
  ELSE
    v_tx := ledger._resolve_hold(v_hold, 0, 'released', 'release');
  END IF;
  RETURN jsonb_build_object('status', 200, 'body', jsonb_build_object(
    'hold', ledger._hold_json(v_hold), 'transaction_id', v_tx,
    'available_milli', ledger._available(p_user),
    'held_milli', (SELECT held_milli FROM ledger.wallets WHERE user_id = p_user),
    'debt_milli', (SELECT debt_milli FROM ledger.wallets WHERE user_id = p_user)));
END $$;

-- Refund part or all of a debit or capture: the amount goes back to the lots the
-- charge drew from (longest-lived first), each through `_give_back`. A charge made
-- before migration 0004 has no draws: its refund becomes a `refund` lot that never
-- expires, as before (there is no record of its lots to return to).
CREATE OR REPLACE FUNCTION ledger._op_refund(op jsonb, p_user text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  t ledger.transactions%ROWTYPE;
  v_may text := op->'auth'->>'charges';
  d record;
  v_spent bigint;
  v_refunded bigint;
  v_amount bigint;
  v_left bigint;
  v_give bigint;
  v_part bigint[];
  v_back bigint := 0;
  v_settled bigint := 0;
  v_debt bigint;
  v_accounts text[];
  v_owners text[];
  v_amounts bigint[];
  v_legacy boolean;
  v_tx bigint;
  v_bal jsonb;
BEGIN
  SELECT * INTO t FROM ledger.transactions WHERE id = (op->>'transaction_id')::bigint;
  IF t.kind NOT IN ('debit', 'capture') THEN
    RETURN ledger._err(422, 'not_refundable', 'Only debits and captures can be refunded',
                       jsonb_build_object('kind', t.kind));
  END IF;
  IF v_may IS NULL THEN
    RETURN ledger._err(403, 'forbidden', 'No authority to refund');
  END IF;
  IF v_may <> '*' AND v_may IS DISTINCT FROM t.app THEN
    RETURN ledger._err(403, 'not_your_charge', 'This charge was made by another app');
  END IF;
  SELECT COALESCE(SUM(amount_milli), 0) INTO v_spent FROM ledger.postings
   WHERE tx_id = t.id AND account = 'spend';
  SELECT COALESCE(SUM(amount_milli), 0) INTO v_refunded FROM ledger.transactions
   WHERE refund_of = t.id AND kind = 'refund';
  v_amount := COALESCE((op->>'amount')::bigint, v_spent - v_refunded);
  IF v_spent - v_refunded <= 0 THEN
    RETURN ledger._err(409, 'already_refunded', 'Nothing left to refund on this transaction',
                       jsonb_build_object('refunded_milli', v_refunded));
  END IF;
  IF v_amount > v_spent - v_refunded THEN
    RETURN ledger._err(422, 'refund_exceeds_charge', 'Cannot refund more than was charged',
                       jsonb_build_object('refundable_milli', v_spent - v_refunded,
                                          'requested_milli', v_amount));
  END IF;
  v_accounts := ARRAY['spend'];
  v_owners := ARRAY[t.app];
  v_amounts := ARRAY[-v_amount];
  v_legacy := NOT EXISTS (SELECT 1 FROM ledger.draws WHERE tx_id = t.id);
  IF v_legacy THEN
    SELECT debt_milli INTO v_debt FROM ledger.wallets WHERE user_id = p_user;
    v_settled := least(v_amount, v_debt);
    v_back := v_amount - v_settled;
  ELSE
    v_left := v_amount;
    FOR d IN
      SELECT dr.grant_id, dr.amount_milli - dr.returned_milli AS open_milli, g.source
        FROM ledger.draws dr JOIN ledger.grants g ON g.id = dr.grant_id
       WHERE dr.tx_id = t.id AND dr.amount_milli > dr.returned_milli
       ORDER BY g.expires_at DESC NULLS FIRST, g.priority ASC, g.id DESC
       FOR UPDATE OF dr
    LOOP
      EXIT WHEN v_left = 0;
      v_give := least(d.open_milli, v_left);
      UPDATE ledger.draws SET returned_milli = returned_milli + v_give
       WHERE tx_id = t.id AND grant_id = d.grant_id;
      v_part := ledger._give_back(p_user, d.grant_id, v_give);
      v_back := v_back + v_part[1];
      v_settled := v_settled + v_part[2];
      IF v_part[3] > 0 THEN
        v_accounts := v_accounts || 'expired'::text;
        v_owners := v_owners || d.source;
        v_amounts := v_amounts || v_part[3];
      END IF;
      v_left := v_left - v_give;
    END LOOP;
    IF v_left > 0 THEN
      RAISE EXCEPTION 'ledger._op_refund: draws of % short by %', t.id, v_left;
    END IF;
  END IF;
  v_tx := ledger._journal('refund', p_user, t.app, 'refund', v_back, v_amount,
                          op->>'description', op->>'reference', NULL, t.id,
                          v_accounts || ARRAY['wallet', 'debt'],
                          v_owners || ARRAY[p_user, p_user],
                          v_amounts || ARRAY[v_back, v_settled]);
  IF v_legacy THEN
    UPDATE ledger.wallets SET debt_milli = debt_milli - v_settled WHERE user_id = p_user;
    INSERT INTO ledger.grants (user_id, source, amount_milli, remaining_milli, settled_milli,
                               reference, tx_id)
    VALUES (p_user, 'refund', v_amount, v_back, v_settled, 'refund:' || t.id, v_tx);
  END IF;
  UPDATE ledger.wallets SET balance_milli = balance_milli + v_back, updated_at = now()
   WHERE user_id = p_user;
  v_bal := ledger._changed(p_user, v_back, 'refund', t.app, v_tx);
  RETURN jsonb_build_object('status', 201, 'body', jsonb_build_object(
    'transaction_id', v_tx, 'refund_of', t.id, 'user_id', p_user, 'app', t.app,
    'amount_milli', v_amount, 'refundable_milli', v_spent - v_refunded - v_amount,
    'returned_milli', v_back, 'debt_settled_milli', v_settled,
    'expired_milli', v_amount - v_back - v_settled, 'created_at', now()) || v_bal);
END $$;

-- Take back credit a refunded payment granted. `grant_reference` names the payment's
-- lot (reference and source). Clawable = what the lot granted - what of it expired -
-- what earlier clawbacks of it took (and, once the lot has expired, what of it still
-- sits in holds: that expires with them). Taken in order: the lot's remaining, active
-- holds drawn from the lot (shrunk; `hold.changed` to their owner), the part already
-- spent from other spendable credit, and the rest becomes debt.
CREATE OR REPLACE FUNCTION ledger._op_clawback(op jsonb, p_user text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_requested bigint := (op->>'amount')::bigint;
  v_source text := op->>'source';
  v_grant_ref text := op->>'grant_reference';
  g ledger.grants%ROWTYPE;
  a record;
  o record;
  v_lapsed boolean;
  v_prior bigint;
  v_held_lot bigint;
  v_total bigint;
  v_left bigint;
  v_part bigint;
  v_from_lot bigint;
  v_from_holds bigint := 0;
  v_from_others bigint := 0;
  v_debt bigint;
  v_shrunk uuid[] := '{}';
  v_took bigint[] := '{}';
  v_tx bigint;
  i int;
  v_bal jsonb;
BEGIN
  IF v_requested IS NULL OR v_requested <= 0 THEN
    RETURN ledger._err(422, 'invalid_amount', 'A clawback needs a positive amount');
  END IF;
  IF v_source IS NULL OR v_grant_ref IS NULL THEN
    RETURN ledger._err(422, 'grant_reference_required',
                       'A clawback names the source and the reference of the grant it reverses');
  END IF;
  SELECT * INTO g FROM ledger.grants
   WHERE user_id = p_user AND source = v_source AND reference = v_grant_ref
   ORDER BY id LIMIT 1 FOR UPDATE;
  IF NOT FOUND THEN
    RETURN ledger._err(404, 'grant_not_found', 'No grant with this reference to claw back',
                       jsonb_build_object('grant_reference', v_grant_ref));
  END IF;
  v_lapsed := g.expires_at IS NOT NULL AND g.expires_at <= clock_timestamp();
  IF v_lapsed AND g.remaining_milli > 0 THEN
    -- Breakage is decided first: expired credit is never clawed (nor counted as spent).
    PERFORM ledger._expire_grant(g.id);
    SELECT * INTO g FROM ledger.grants WHERE id = g.id;
  END IF;
  SELECT COALESCE(SUM(amount_milli), 0) INTO v_prior FROM ledger.transactions
   WHERE refund_of = g.tx_id AND kind = 'clawback';
  SELECT COALESCE(SUM(ha.amount_milli), 0) INTO v_held_lot
    FROM ledger.hold_allocations ha JOIN ledger.holds h ON h.id = ha.hold_id
   WHERE ha.grant_id = g.id AND h.status = 'active';
  v_total := g.amount_milli - g.expired_milli - v_prior
             - CASE WHEN v_lapsed THEN v_held_lot ELSE 0 END;
  v_total := greatest(0, least(v_requested, v_total));

  v_from_lot := least(v_total, g.remaining_milli);
  IF v_from_lot > 0 THEN
    UPDATE ledger.grants SET remaining_milli = remaining_milli - v_from_lot,
                             clawed_milli = clawed_milli + v_from_lot
     WHERE id = g.id;
  END IF;
  v_left := v_total - v_from_lot;

  IF NOT v_lapsed THEN
    FOR a IN
      SELECT ha.hold_id, ha.amount_milli FROM ledger.hold_allocations ha
        JOIN ledger.holds h ON h.id = ha.hold_id
       WHERE ha.grant_id = g.id AND h.status = 'active' AND ha.amount_milli > 0
       ORDER BY h.created_at DESC, h.id
       FOR UPDATE OF h
    LOOP
      EXIT WHEN v_left = 0;
      v_part := least(a.amount_milli, v_left);
      UPDATE ledger.hold_allocations SET amount_milli = amount_milli - v_part
       WHERE hold_id = a.hold_id AND grant_id = g.id;
      UPDATE ledger.holds SET clawed_milli = clawed_milli + v_part WHERE id = a.hold_id;
      v_shrunk := v_shrunk || a.hold_id;
      v_took := v_took || v_part;
      v_from_holds := v_from_holds + v_part;
      v_left := v_left - v_part;
    END LOOP;
    IF v_from_holds > 0 THEN
      UPDATE ledger.grants SET clawed_milli = clawed_milli + v_from_holds WHERE id = g.id;
    END IF;
  END IF;

  -- What was already spent from the lot: from the user's other spendable credit first
  -- (so no spendable credit sits beside a debt), the rest is debt.
  FOR o IN
    SELECT id, remaining_milli FROM ledger.grants
     WHERE user_id = p_user AND id <> g.id AND remaining_milli > 0
       AND (expires_at IS NULL OR expires_at > clock_timestamp())
     ORDER BY expires_at ASC NULLS LAST, priority DESC, id ASC
     FOR UPDATE
  LOOP
    EXIT WHEN v_left = 0;
    v_part := least(o.remaining_milli, v_left);
    UPDATE ledger.grants SET remaining_milli = remaining_milli - v_part,
                             clawed_milli = clawed_milli + v_part
     WHERE id = o.id;
    v_from_others := v_from_others + v_part;
    v_left := v_left - v_part;
  END LOOP;
  v_debt := v_left;

  UPDATE ledger.wallets
     SET balance_milli = balance_milli - v_from_lot - v_from_others,
         held_milli = held_milli - v_from_holds,
         debt_milli = debt_milli + v_debt, updated_at = now()
   WHERE user_id = p_user;
  v_tx := ledger._journal('clawback', p_user, op->>'app', v_source,
                          -(v_from_lot + v_from_others), v_total,
                          op->>'description', op->>'reference', NULL, g.tx_id,
                          ARRAY['wallet', 'held', 'debt', 'issuance'],
                          ARRAY[p_user, p_user, p_user, v_source],
                          ARRAY[-(v_from_lot + v_from_others), -v_from_holds, -v_debt, v_total]);
  FOR i IN 1 .. coalesce(array_length(v_shrunk, 1), 0) LOOP
    UPDATE ledger.holds
       SET status = 'clawed', resolved_at = now(), resolve_tx_id = v_tx
     WHERE id = v_shrunk[i] AND clawed_milli = amount_milli;
    INSERT INTO ledger.outbox (id, topic, payload)
    SELECT gen_random_uuid(), 'hold.changed',
           jsonb_build_object('hold', ledger._hold_json(v_shrunk[i]), 'owner', h.owner,
                              'app', h.app, 'user_id', p_user, 'reason', 'clawback',
                              'clawed_milli', v_took[i], 'transaction_id', v_tx)
      FROM ledger.holds h WHERE h.id = v_shrunk[i];
  END LOOP;
  v_bal := ledger._changed(p_user, -(v_from_lot + v_from_others), 'clawback', op->>'app', v_tx);
  RETURN jsonb_build_object('status', 201, 'body', jsonb_build_object(
    'transaction_id', v_tx, 'user_id', p_user, 'source', v_source,
    'grant_id', g.id, 'requested_milli', v_requested, 'amount_milli', v_total,
    'taken_milli', v_from_lot + v_from_others + v_from_holds,
    'held_taken_milli', v_from_holds, 'debt_added_milli', v_debt,
    'reference', op->>'reference', 'created_at', now()) || v_bal);
END $$;

-- Store an outcome under an idempotency key (first writer wins; the wallet lock
-- serializes one user's requests, so a conflict here is another user's request under
-- the same key, which the caller's lookup reports as 409 on its retry).
CREATE OR REPLACE FUNCTION ledger._remember(p_scope text, p_key text, p_hash text,
                                            p_res jsonb)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO ledger.idempotency_keys (scope, key, request_hash, status_code, response)
  VALUES (p_scope, p_key, p_hash, (p_res->>'status')::int,
          COALESCE(p_res->'body', jsonb_build_object('error', p_res->'error')))
  ON CONFLICT DO NOTHING;
END $$;

-- One operation. `op` carries: op, user_id | hold_id | transaction_id, amount (milli),
-- app, reference, description, ...; `auth` (required, see docs/ledger.md "Authority");
-- and for idempotency `scope`, `hash` and `key` (the header key or the natural one)
-- plus `alt_key` (the natural key when a header key was also sent).
CREATE OR REPLACE FUNCTION ledger.apply(op jsonb)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_kind text := op->>'op';
  v_auth jsonb := op->'auth';
  v_who text;
  v_user text;
  v_keys text[];
  k text;
  r record;
  v_replay jsonb;
  v_res jsonb;
  v_status int;
  v_created boolean := false;
BEGIN
  IF v_kind IS NULL OR v_kind NOT IN ('open', 'grant', 'debit', 'reserve', 'capture',
                                      'release', 'refund', 'clawback') THEN
    RETURN ledger._err(400, 'unknown_operation', 'Unknown ledger operation');
  END IF;
  -- Deny by default: no authority, or one that does not say whose money, is 403.
  IF v_auth IS NULL OR jsonb_typeof(v_auth) <> 'object' OR v_auth->>'user' IS NULL THEN
    RETURN ledger._err(403, 'forbidden', 'This operation carries no authority');
  END IF;

  IF v_kind IN ('capture', 'release') THEN
    SELECT user_id INTO v_user FROM ledger.holds WHERE id = (op->>'hold_id')::uuid;
    IF NOT FOUND THEN
      RETURN ledger._err(404, 'hold_not_found', 'No such hold');
    END IF;
  ELSIF v_kind = 'refund' THEN
    SELECT user_id INTO v_user FROM ledger.transactions
     WHERE id = (op->>'transaction_id')::bigint;
    IF NOT FOUND THEN
      RETURN ledger._err(404, 'transaction_not_found', 'No such transaction');
    END IF;
  ELSE
    v_user := op->>'user_id';
  END IF;

  v_who := v_auth->>'user';
  IF v_who = 'any' THEN
    NULL;
  ELSIF v_who LIKE 'self:%' THEN
    IF substr(v_who, 6) IS DISTINCT FROM v_user THEN
      RETURN ledger._err(403, 'wrong_user', 'This principal may act only on its own user');
    END IF;
  ELSIF v_who LIKE 'linked:%' THEN
    PERFORM 1 FROM ledger.app_links WHERE user_id = v_user AND app = substr(v_who, 8);
    IF NOT FOUND THEN
      RETURN ledger._err(403, 'user_not_linked', 'This user is not linked to the app',
                         jsonb_build_object('app', substr(v_who, 8)));
    END IF;
  ELSE
    RETURN ledger._err(403, 'forbidden', 'Unknown authority over users');
  END IF;

  IF v_kind = 'open' THEN
    INSERT INTO ledger.wallets (user_id) VALUES (v_user) ON CONFLICT DO NOTHING;
    v_created := FOUND;
  END IF;

  PERFORM 1 FROM ledger.wallets WHERE user_id = v_user FOR UPDATE;
  IF NOT FOUND THEN
    RETURN ledger._err(404, 'unknown_user', 'No ledger account for this user',
                       jsonb_build_object('user_id', v_user));
  END IF;

  v_keys := array_remove(ARRAY[op->>'key', op->>'alt_key'], NULL);
  FOREACH k IN ARRAY v_keys LOOP
    SELECT request_hash, status_code, response INTO r FROM ledger.idempotency_keys
     WHERE scope = op->>'scope' AND key = k;
    IF FOUND THEN
      IF r.request_hash <> op->>'hash' THEN
        RETURN ledger._err(409, 'idempotency_key_reused',
                           'This idempotency key or reference was used with a different request');
      END IF;
      IF v_replay IS NULL THEN
        v_replay := CASE WHEN r.status_code >= 400
                         THEN jsonb_build_object('status', r.status_code,
                                                 'error', r.response->'error')
                         ELSE jsonb_build_object('status', r.status_code, 'body', r.response)
                    END || jsonb_build_object('replayed', true);
      END IF;
    END IF;
  END LOOP;
  IF v_replay IS NOT NULL THEN
    -- Known under one key: remember it under the other too, then replay.
    FOREACH k IN ARRAY v_keys LOOP
      PERFORM ledger._remember(op->>'scope', k, op->>'hash', v_replay - 'replayed');
    END LOOP;
    RETURN v_replay;
  END IF;

  PERFORM ledger._sweep_holds(v_user);

  CASE v_kind
    WHEN 'grant' THEN v_res := ledger._op_grant(op, v_user);
    WHEN 'debit' THEN v_res := ledger._op_debit(op, v_user);
    WHEN 'reserve' THEN v_res := ledger._op_reserve(op, v_user);
    WHEN 'capture', 'release' THEN v_res := ledger._op_resolve(op, v_user);
    WHEN 'refund' THEN v_res := ledger._op_refund(op, v_user);
    WHEN 'clawback' THEN v_res := ledger._op_clawback(op, v_user);
    ELSE  -- 'open'
      IF (op->>'amount')::bigint > 0 THEN
        -- The welcome grant rides on the idempotency key, so it happens once per user.
        v_res := ledger._op_grant(op, v_user);
      ELSE
        v_res := jsonb_build_object('status', 200, 'body', jsonb_build_object('user_id', v_user));
      END IF;
      v_res := jsonb_set(v_res, '{body,created}', to_jsonb(v_created));
  END CASE;

  v_status := (v_res->>'status')::int;
  -- The first outcome is the answer for good, failures included; a denial (403) is
  -- about the caller, not the request, and is not remembered. A replayed resolution
  -- (a hold resolved before) is remembered like any outcome.
  IF v_status <> 403 THEN
    FOREACH k IN ARRAY v_keys LOOP
      PERFORM ledger._remember(op->>'scope', k, op->>'hash', v_res - 'replayed');
    END LOOP;
  END IF;
  IF v_auth ? 'audit' AND v_status <> 403 THEN
    INSERT INTO ledger.audit_log (tx_id, actor, reason, op, user_id, amount_milli, status)
    VALUES ((v_res->'body'->>'transaction_id')::bigint, v_auth->'audit'->>'actor',
            v_auth->'audit'->>'reason', v_kind, v_user, (op->>'amount')::bigint, v_status);
  END IF;
  RETURN v_res;
END $$;

-- Many operations in one transaction (group commit). Each runs in its own
-- subtransaction: a business failure is a result, and a raised error (a NUL byte
-- jsonb refuses, a constraint) becomes that operation's error result while its
-- neighbours commit. Deadlocks and serialization failures (class 40) and a unique
-- violation of an idempotency key are re-raised: the batcher retries those.
-- `ops` is json, not jsonb: json keeps text it cannot store, so the refusal happens per
-- operation, in its own block, not for the whole batch.
CREATE OR REPLACE FUNCTION ledger.apply_batch(ops json)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_out jsonb[] := '{}';
  v_op json;
  v_res jsonb;
  v_state text;
  v_msg text;
BEGIN
  FOR v_op IN SELECT value FROM json_array_elements(ops) LOOP
    BEGIN
      v_res := ledger.apply(v_op::jsonb);
    EXCEPTION WHEN OTHERS THEN
      GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_msg = MESSAGE_TEXT;
      IF v_state LIKE '40%' OR v_state = '23505' THEN
        RAISE;
      END IF;
      v_res := CASE WHEN v_state LIKE '22%'
        THEN ledger._err(422, 'invalid_input', 'The operation holds a value the ledger cannot store',
                         jsonb_build_object('sqlstate', v_state, 'reason', v_msg))
        ELSE ledger._err(500, 'ledger_error', 'The ledger could not apply this operation',
                         jsonb_build_object('sqlstate', v_state))
      END;
    END;
    -- An array grows in place; `jsonb || jsonb` would copy the whole result each time.
    v_out := array_append(v_out, v_res);
  END LOOP;
  RETURN to_jsonb(v_out);
END $$;

-- Jobs. Both take the wallet lock first, like every operation.
CREATE OR REPLACE FUNCTION ledger.expire_holds(p_limit int)
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
  v_user text;
  v_count int := 0;
BEGIN
  FOR v_user IN
    SELECT DISTINCT user_id FROM (
      SELECT user_id FROM ledger.holds
       WHERE status = 'active' AND expires_at <= clock_timestamp()
       ORDER BY expires_at LIMIT p_limit) s
     ORDER BY user_id
  LOOP
    PERFORM 1 FROM ledger.wallets WHERE user_id = v_user FOR UPDATE;
    PERFORM ledger._sweep_holds(v_user);
    v_count := v_count + 1;
  END LOOP;
  RETURN v_count;
END $$;

CREATE OR REPLACE FUNCTION ledger.expire_grants(p_limit int)
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
  g record;
  v_count int := 0;
  v_tx bigint;
BEGIN
  FOR g IN
    SELECT id, user_id FROM ledger.grants
     WHERE remaining_milli > 0 AND expires_at <= clock_timestamp()
     ORDER BY user_id, id LIMIT p_limit
  LOOP
    PERFORM 1 FROM ledger.wallets WHERE user_id = g.user_id FOR UPDATE;
    -- Re-read under the lock: a concurrent run may have swept it already.
    PERFORM 1 FROM ledger.grants WHERE id = g.id AND remaining_milli > 0 FOR UPDATE;
    IF FOUND THEN
      v_tx := ledger._expire_grant(g.id);
      v_count := v_count + 1;
    END IF;
  END LOOP;
  RETURN v_count;
END $$;

CREATE OR REPLACE FUNCTION ledger._expire_grant(p_grant bigint)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  g ledger.grants%ROWTYPE;
  v_tx bigint;
BEGIN
  SELECT * INTO g FROM ledger.grants WHERE id = p_grant;
  UPDATE ledger.grants SET remaining_milli = 0, expired_milli = expired_milli + g.remaining_milli
   WHERE id = p_grant;
  UPDATE ledger.wallets SET balance_milli = balance_milli - g.remaining_milli,
         updated_at = now()
   WHERE user_id = g.user_id;
  v_tx := ledger._journal('grant_expiry', g.user_id, NULL, g.source, 0, g.remaining_milli,
                          'Expired credit', 'grant:' || g.id, NULL, NULL,
                          ARRAY['wallet', 'expired'], ARRAY[g.user_id, g.source],
                          ARRAY[-g.remaining_milli, g.remaining_milli]);
  PERFORM ledger._changed(g.user_id, 0, 'grant_expiry', NULL, v_tx);
  RETURN v_tx;
END $$;
