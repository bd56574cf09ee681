-- Ledger mutations as PL/pgSQL functions: every rule that moves money runs inside
-- one transaction, next to the rows it locks, in one round trip. The service
-- batches concurrent calls into one transaction (group commit, see batcher.py).
--
-- Lock order, always: the user's wallet row first, then that user's holds, then
-- grants. Every mutation locks the wallet, so one user's operations serialize
-- while different users run in parallel.
--
-- Business failures are returned, never raised, so one failed operation does not
-- abort the others in its batch: {"status": 402, "error": {...}}. Successes are
-- {"status": 200|201, "body": {...}} with amounts in milli-Ku.

CREATE OR REPLACE FUNCTION ledger._err(p_status int, p_code text, p_message text,
                                       p_detail jsonb DEFAULT '{}'::jsonb)
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
  SELECT jsonb_build_object('status', p_status, 'error',
         jsonb_build_object('code', p_code, 'message', p_message, 'detail', p_detail))
$$;

-- Spendable now: unexpired grants' remaining. Expired credit is never spendable,
-- whether or not the expiry job has swept it.
CREATE OR REPLACE FUNCTION ledger._available(p_user text)
RETURNS bigint LANGUAGE sql STABLE AS $$
  SELECT COALESCE(SUM(remaining_milli), 0)::bigint FROM ledger.grants
   WHERE user_id = p_user AND remaining_milli > 0
     AND (expires_at IS NULL OR expires_at > now())
$$;

CREATE OR REPLACE FUNCTION ledger._journal(
  p_kind text, p_user text, p_app text, p_source text, p_delta bigint, p_amount bigint,
  p_description text, p_reference text, p_hold uuid, p_refund_of bigint,
  p_accounts text[], p_owners text[], p_amounts bigint[])
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  v_tx bigint;
BEGIN
  INSERT INTO ledger.transactions (kind, user_id, app, source, delta_milli, amount_milli,
                                   description, reference, hold_id, refund_of)
  VALUES (p_kind, p_user, p_app, p_source, p_delta, p_amount,
          p_description, p_reference, p_hold, p_refund_of)
  RETURNING id INTO v_tx;
  INSERT INTO ledger.postings (tx_id, account, owner, amount_milli)
  SELECT v_tx, a, o, m FROM unnest(p_accounts, p_owners, p_amounts) AS t(a, o, m) WHERE m <> 0;
  RETURN v_tx;
END $$;

-- Emit credits.changed for the user; `p_available` when the caller already knows it.
CREATE OR REPLACE FUNCTION ledger._changed(p_user text, p_delta bigint, p_reason text,
                                           p_app text, p_tx bigint,
                                           p_available bigint DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_available bigint := COALESCE(p_available, ledger._available(p_user));
  v_held bigint;
BEGIN
  SELECT held_milli INTO v_held FROM ledger.wallets WHERE user_id = p_user;
  INSERT INTO ledger.outbox (id, topic, payload)
  VALUES (gen_random_uuid(), 'credits.changed',
          jsonb_build_object('user_id', p_user, 'available_milli', v_available,
                             'held_milli', v_held, 'delta_milli', p_delta, 'reason', p_reason,
                             'app', p_app, 'transaction_id', p_tx));
  RETURN jsonb_build_object('available_milli', v_available, 'held_milli', v_held);
END $$;

-- Take p_amount from the user's spendable grants, soonest-expiring first, then by
-- priority, then oldest. The caller has checked availability under the wallet lock.
CREATE OR REPLACE FUNCTION ledger._draw(p_user text, p_amount bigint, p_hold uuid)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  g record;
  v_left bigint := p_amount;
  v_take bigint;
BEGIN
  FOR g IN
    SELECT id, remaining_milli FROM ledger.grants
     WHERE user_id = p_user AND remaining_milli > 0
       AND (expires_at IS NULL OR expires_at > now())
     ORDER BY expires_at ASC NULLS LAST, priority DESC, id ASC
     FOR UPDATE
  LOOP
    v_take := least(g.remaining_milli, v_left);
    UPDATE ledger.grants SET remaining_milli = remaining_milli - v_take WHERE id = g.id;
    IF p_hold IS NOT NULL THEN
      INSERT INTO ledger.hold_allocations (hold_id, grant_id, amount_milli)
      VALUES (p_hold, g.id, v_take);
    END IF;
    v_left := v_left - v_take;
    EXIT WHEN v_left = 0;
  END LOOP;
  IF v_left > 0 THEN
    RAISE EXCEPTION 'ledger._draw: % milli-Ku short for user %', v_left, p_user;
  END IF;
END $$;

CREATE OR REPLACE FUNCTION ledger._hold_json(p_hold uuid)
RETURNS jsonb LANGUAGE sql STABLE AS $$
  SELECT jsonb_build_object('id', id, 'user_id', user_id, 'app', app,
                            'amount_milli', amount_milli, 'captured_milli', captured_milli,
                            'status', status, 'reference', reference,
                            'description', description, 'expires_at', expires_at,
                            'created_at', created_at, 'resolved_at', resolved_at)
    FROM ledger.holds WHERE id = p_hold
$$;

-- Resolve a locked active hold: capture p_capture of it, give the rest back to the
-- grants it was drawn from (latest-expiring first), and journal it.
CREATE OR REPLACE FUNCTION ledger._resolve_hold(p_hold uuid, p_capture bigint, p_status text,
                                                p_kind text)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  h ledger.holds%ROWTYPE;
  a record;
  v_return bigint;
  v_left bigint;
  v_give bigint;
  v_tx bigint;
BEGIN
  SELECT * INTO h FROM ledger.holds WHERE id = p_hold FOR UPDATE;
  v_return := h.amount_milli - p_capture;
  v_left := v_return;
  FOR a IN
    SELECT ha.grant_id, ha.amount_milli FROM ledger.hold_allocations ha
      JOIN ledger.grants g ON g.id = ha.grant_id
     WHERE ha.hold_id = p_hold
     ORDER BY g.expires_at DESC NULLS FIRST, g.priority ASC, g.id DESC
  LOOP
    EXIT WHEN v_left = 0;
    v_give := least(a.amount_milli, v_left);
    UPDATE ledger.grants SET remaining_milli = remaining_milli + v_give WHERE id = a.grant_id;
    v_left := v_left - v_give;
  END LOOP;
  UPDATE ledger.wallets
     SET balance_milli = balance_milli + v_return, held_milli = held_milli - h.amount_milli,
         updated_at = now()
   WHERE user_id = h.user_id;
  v_tx := ledger._journal(p_kind, h.user_id, h.app, NULL, v_return, p_capture,
                          h.description, h.reference, h.id, NULL,
                          ARRAY['held', 'spend', 'wallet'],
                          ARRAY[h.user_id, h.app, h.user_id],
                          ARRAY[-h.amount_milli, p_capture, v_return]);
  UPDATE ledger.holds
     SET status = p_status, captured_milli = p_capture, resolved_at = now(), resolve_tx_id = v_tx
   WHERE id = p_hold;
  PERFORM ledger._changed(h.user_id, v_return, p_kind, h.app, v_tx);
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
     WHERE user_id = p_user AND status = 'active' AND expires_at <= now()
     ORDER BY id
  LOOP
    PERFORM ledger._resolve_hold(v_hold, 0, 'expired', 'hold_expiry');
  END LOOP;
END $$;

-- Superseded by ledger_v2_billing.sql (migration 0003): grants settle debt first.
CREATE OR REPLACE FUNCTION ledger._op_grant(op jsonb, p_user text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_amount bigint := (op->>'amount')::bigint;
  v_source text := op->>'source';
  v_expires timestamptz := (op->>'expires_at')::timestamptz;
  v_tx bigint;
  v_grant bigint;
  v_bal jsonb;
BEGIN
  IF v_expires IS NOT NULL AND v_expires <= now() THEN
    RETURN ledger._err(422, 'already_expired', 'expires_at is in the past');
  END IF;
  v_tx := ledger._journal('grant', p_user, op->>'app', v_source, v_amount, v_amount,
                          op->>'description', op->>'reference', NULL, NULL,
                          ARRAY['issuance', 'wallet'], ARRAY[v_source, p_user],
                          ARRAY[-v_amount, v_amount]);
  INSERT INTO ledger.grants (user_id, source, amount_milli, remaining_milli, priority,
                             expires_at, reference, tx_id)
  VALUES (p_user, v_source, v_amount, v_amount, COALESCE((op->>'priority')::int, 0),
          v_expires, op->>'reference', v_tx)
  RETURNING id INTO v_grant;
  UPDATE ledger.wallets SET balance_milli = balance_milli + v_amount, updated_at = now()
   WHERE user_id = p_user;
  v_bal := ledger._changed(p_user, v_amount, 'grant:' || v_source, op->>'app', v_tx);
  RETURN jsonb_build_object('status', 201, 'body', jsonb_build_object(
    'grant_id', v_grant, 'transaction_id', v_tx, 'user_id', p_user, 'source', v_source,
    'amount_milli', v_amount, 'expires_at', v_expires, 'reference', op->>'reference',
    'created_at', now()) || v_bal);
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
  IF v_available < v_amount THEN
    RETURN ledger._err(402, 'insufficient_credits', 'Insufficient credits',
                       jsonb_build_object('available_milli', v_available,
                                          'required_milli', v_amount));
  END IF;
  PERFORM ledger._draw(p_user, v_amount, NULL);
  UPDATE ledger.wallets SET balance_milli = balance_milli - v_amount, updated_at = now()
   WHERE user_id = p_user;
  v_tx := ledger._journal('debit', p_user, v_app, NULL, -v_amount, v_amount,
                          op->>'description', op->>'reference', NULL, NULL,
                          ARRAY['wallet', 'spend'], ARRAY[p_user, v_app],
                          ARRAY[-v_amount, v_amount]);
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
  v_available bigint := ledger._available(p_user);
  v_hold uuid := gen_random_uuid();
  v_tx bigint;
  v_bal jsonb;
BEGIN
  IF v_available < v_amount THEN
    RETURN ledger._err(402, 'insufficient_credits', 'Insufficient credits',
                       jsonb_build_object('available_milli', v_available,
                                          'required_milli', v_amount));
  END IF;
  v_tx := ledger._journal('reserve', p_user, v_app, NULL, -v_amount, v_amount,
                          op->>'description', op->>'reference', v_hold, NULL,
                          ARRAY['wallet', 'held'], ARRAY[p_user, p_user],
                          ARRAY[-v_amount, v_amount]);
  INSERT INTO ledger.holds (id, user_id, app, amount_milli, reference, description,
                            expires_at, reserve_tx_id)
  VALUES (v_hold, p_user, v_app, v_amount, op->>'reference', op->>'description',
          now() + make_interval(secs => (op->>'ttl_seconds')::int), v_tx);
  PERFORM ledger._draw(p_user, v_amount, v_hold);
  UPDATE ledger.wallets
     SET balance_milli = balance_milli - v_amount, held_milli = held_milli + v_amount,
         updated_at = now()
   WHERE user_id = p_user;
  v_bal := ledger._changed(p_user, -v_amount, 'reserve', v_app, v_tx,
                           v_available - v_amount);
  RETURN jsonb_build_object('status', 201, 'body',
    jsonb_build_object('hold', ledger._hold_json(v_hold), 'transaction_id', v_tx) || v_bal);
END $$;

CREATE OR REPLACE FUNCTION ledger._op_resolve(op jsonb, p_user text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_kind text := op->>'op';
  v_hold uuid := (op->>'hold_id')::uuid;
  h ledger.holds%ROWTYPE;
  v_capture bigint;
  v_tx bigint;
BEGIN
  SELECT * INTO h FROM ledger.holds WHERE id = v_hold FOR UPDATE;
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
    v_capture := COALESCE((op->>'amount')::bigint, h.amount_milli);
    IF v_capture > h.amount_milli THEN
      RETURN ledger._err(422, 'capture_exceeds_hold', 'Cannot capture more than is held',
                         jsonb_build_object('held_milli', h.amount_milli,
                                            'requested_milli', v_capture));
    END IF;
    v_tx := ledger._resolve_hold(v_hold, v_capture, 'captured', 'capture');
  ELSE
    v_tx := ledger._resolve_hold(v_hold, 0, 'released', 'release');
  END IF;
  RETURN jsonb_build_object('status', 200, 'body', jsonb_build_object(
    'hold', ledger._hold_json(v_hold), 'transaction_id', v_tx,
    'available_milli', ledger._available(p_user),
    'held_milli', (SELECT held_milli FROM ledger.wallets WHERE user_id = p_user)));
END $$;

CREATE OR REPLACE FUNCTION ledger._op_refund(op jsonb, p_user text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  t ledger.transactions%ROWTYPE;
  v_spent bigint;
  v_refunded bigint;
  v_amount bigint;
  v_tx bigint;
  v_grant bigint;
  v_bal jsonb;
BEGIN
  SELECT * INTO t FROM ledger.transactions WHERE id = (op->>'transaction_id')::bigint;
  IF t.kind NOT IN ('debit', 'capture') THEN
    RETURN ledger._err(422, 'not_refundable', 'Only debits and captures can be refunded',
                       jsonb_build_object('kind', t.kind));
  END IF;
  IF op->>'only_app' IS NOT NULL AND t.app IS DISTINCT FROM op->>'only_app' THEN
    RETURN ledger._err(403, 'forbidden', 'An app may refund only its own charges');
  END IF;
  SELECT COALESCE(SUM(amount_milli), 0) INTO v_spent FROM ledger.postings
   WHERE tx_id = t.id AND account = 'spend';
  SELECT COALESCE(SUM(amount_milli), 0) INTO v_refunded FROM ledger.transactions
   WHERE refund_of = t.id;
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
  v_tx := ledger._journal('refund', p_user, t.app, 'refund', v_amount, v_amount,
                          op->>'description', op->>'reference', NULL, t.id,
                          ARRAY['spend', 'wallet'], ARRAY[t.app, p_user],
                          ARRAY[-v_amount, v_amount]);
  INSERT INTO ledger.grants (user_id, source, amount_milli, remaining_milli, reference, tx_id)
  VALUES (p_user, 'refund', v_amount, v_amount, 'refund:' || t.id, v_tx)
  RETURNING id INTO v_grant;
  UPDATE ledger.wallets SET balance_milli = balance_milli + v_amount, updated_at = now()
   WHERE user_id = p_user;
  v_bal := ledger._changed(p_user, v_amount, 'refund', t.app, v_tx);
  RETURN jsonb_build_object('status', 201, 'body', jsonb_build_object(
    'transaction_id', v_tx, 'refund_of', t.id, 'user_id', p_user, 'app', t.app,
    'amount_milli', v_amount, 'refundable_milli', v_spent - v_refunded - v_amount,
    'created_at', now()) || v_bal);
END $$;

-- Superseded by ledger_v2_billing.sql (migration 0003), which adds `clawback`.
-- One operation. `op` carries: op, user_id | hold_id | transaction_id, amount (milli),
-- app, reference, description, and optionally scope/key/hash for idempotency and
-- only_user (a user token may touch only its own holds).
CREATE OR REPLACE FUNCTION ledger.apply(op jsonb)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_kind text := op->>'op';
  v_user text;
  v_key text := op->>'key';
  r record;
  v_res jsonb;
  v_created boolean := false;
BEGIN
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
  IF op->>'only_user' IS NOT NULL AND op->>'only_user' <> v_user THEN
    RETURN ledger._err(403, 'wrong_user', 'A user token may act only on its own user');
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

  IF v_key IS NOT NULL THEN
    SELECT request_hash, status_code, response INTO r FROM ledger.idempotency_keys
     WHERE scope = op->>'scope' AND key = v_key;
    IF FOUND THEN
      IF r.request_hash <> op->>'hash' THEN
        RETURN ledger._err(409, 'idempotency_key_reused',
                           'This Idempotency-Key was used with a different request');
      END IF;
      RETURN jsonb_build_object('status', r.status_code, 'body', r.response, 'replayed', true);
    END IF;
  END IF;

  PERFORM ledger._sweep_holds(v_user);

  CASE v_kind
    WHEN 'grant' THEN v_res := ledger._op_grant(op, v_user);
    WHEN 'debit' THEN v_res := ledger._op_debit(op, v_user);
    WHEN 'reserve' THEN v_res := ledger._op_reserve(op, v_user);
    WHEN 'capture', 'release' THEN v_res := ledger._op_resolve(op, v_user);
    WHEN 'refund' THEN v_res := ledger._op_refund(op, v_user);
    WHEN 'open' THEN
      IF (op->>'amount')::bigint > 0 THEN
        -- The welcome grant rides on the idempotency key, so it happens once per user.
        v_res := ledger._op_grant(op, v_user);
      ELSE
        v_res := jsonb_build_object('status', 200, 'body', jsonb_build_object('user_id', v_user));
      END IF;
      v_res := jsonb_set(v_res, '{body,created}', to_jsonb(v_created));
    ELSE
      RETURN ledger._err(400, 'unknown_operation', 'Unknown ledger operation');
  END CASE;

  IF v_key IS NOT NULL AND (v_res->>'status')::int < 300 THEN
    INSERT INTO ledger.idempotency_keys (scope, key, request_hash, status_code, response)
    VALUES (op->>'scope', v_key, op->>'hash', (v_res->>'status')::int, v_res->'body');
  END IF;
  RETURN v_res;
END $$;

-- Many operations in one transaction (group commit). Each is independent: a
-- business failure in one leaves the others applied.
CREATE OR REPLACE FUNCTION ledger.apply_batch(ops jsonb)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_out jsonb := '[]'::jsonb;
  v_op jsonb;
BEGIN
  FOR v_op IN SELECT value FROM jsonb_array_elements(ops) LOOP
    v_out := v_out || jsonb_build_array(ledger.apply(v_op));
  END LOOP;
  RETURN v_out;
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
       WHERE status = 'active' AND expires_at <= now() ORDER BY expires_at LIMIT p_limit) s
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
     WHERE remaining_milli > 0 AND expires_at <= now()
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
  UPDATE ledger.grants SET remaining_milli = 0 WHERE id = p_grant;
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

-- The journal is append-only: corrections are new transactions.
CREATE OR REPLACE FUNCTION ledger._append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'ledger.% is append-only', TG_TABLE_NAME;
END $$;

DROP TRIGGER IF EXISTS transactions_append_only ON ledger.transactions;
CREATE TRIGGER transactions_append_only BEFORE UPDATE OR DELETE ON ledger.transactions
  FOR EACH ROW EXECUTE FUNCTION ledger._append_only();
DROP TRIGGER IF EXISTS postings_append_only ON ledger.postings;
CREATE TRIGGER postings_append_only BEFORE UPDATE OR DELETE ON ledger.postings
  FOR EACH ROW EXECUTE FUNCTION ledger._append_only();
