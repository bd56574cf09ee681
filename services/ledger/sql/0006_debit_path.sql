-- Ledger v5 (migration 0006): one debit in fewer statements and function calls, and one
-- outbox row per batch.
--
-- Installed by migration 0006 after 0005_lean_debits.sql. Every function below is
-- stated in full; a function not redefined here keeps its body from the newest earlier
-- file. This file never changes once released (tests/ledger/test_sql_immutable.py).
--
-- No rule changes here; docs/ledger.md ("What one debit costs") has the figures
-- (bench/ledger_sql.py). What changed:
-- * A debit called five helpers (`_available`, `_journal`, `_draw`, `_changed`,
--   `_remember`), each a PL/pgSQL call with its own statements. `_op_debit` (and
--   `_op_reserve`, a hold) now state them inline, and read the user's spendable lots
--   ONCE: the sum (what is available) and the lots in draw order come from the same
--   query, at one instant, under the wallet lock `apply` holds (every writer of a
--   user's lots holds that lock, so the lots cannot change between the read and the
--   draw; the lot UPDATE locks its row anyway). The wallet's debt comes from `apply`'s
--   locked read of the wallet; a hold's JSON from its INSERT (no read back).
-- * `apply` remembers the outcome under its keys itself (no `_remember` call).
-- * The `credits.changed` event of a debit or a hold is returned with the operation's
--   result (`event`) instead of being inserted by the operation: `ledger.apply` inserts
--   it (one row, as before), `ledger.apply_batch` inserts ONE outbox row for the whole
--   batch whose payload is the array of its events in order. The relay
--   (services/kit/outbox.py) publishes each element as its own signed entry, so
--   consumers see exactly the events they saw before.

-- A debit. `p_debt` is the wallet's debt, read by `apply` with the wallet's lock:
-- while it is above 0 nothing is spendable.
CREATE OR REPLACE FUNCTION ledger._op_debit(op jsonb, p_user text, p_debt bigint)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_amount bigint := (op->>'amount')::bigint;
  v_app text := op->>'app';
  v_available bigint := 0;
  v_lots bigint[];
  v_remaining bigint[];
  v_left bigint;
  v_take bigint;
  i int := 0;
  v_tx bigint;
  v_held bigint;
  v_debt bigint;
BEGIN
  IF v_amount IS NULL OR v_amount <= 0 OR v_app IS NULL THEN
    RETURN ledger._err(422, 'invalid_debit', 'A debit needs a positive amount and an app');
  END IF;
  IF p_debt = 0 THEN
    -- Spendable now: unexpired lots' remaining, in the order they are spent
    -- (soonest-expiring first, then by priority, then oldest).
    SELECT COALESCE(SUM(remaining_milli), 0)::bigint,
           array_agg(id ORDER BY expires_at ASC NULLS LAST, priority DESC, id ASC),
           array_agg(remaining_milli ORDER BY expires_at ASC NULLS LAST, priority DESC, id ASC)
      INTO v_available, v_lots, v_remaining
      FROM ledger.grants
     WHERE user_id = p_user AND spendable
       AND (expires_at IS NULL OR expires_at > clock_timestamp());
  END IF;
  IF v_available < v_amount THEN
    RETURN ledger._err(402, 'insufficient_credits', 'Insufficient credits',
                       jsonb_build_object('available_milli', v_available,
                                          'required_milli', v_amount));
  END IF;
  INSERT INTO ledger.transactions (kind, user_id, app, delta_milli, amount_milli,
                                   description, reference)
  VALUES ('debit', p_user, v_app, -v_amount, v_amount, op->>'description', op->>'reference')
  RETURNING id INTO v_tx;
  INSERT INTO ledger.postings (tx_id, account, owner, amount_milli)
  VALUES (v_tx, 'wallet', p_user, -v_amount), (v_tx, 'spend', v_app, v_amount);
  -- One draws row per lot it spends.
  v_left := v_amount;
  WHILE v_left > 0 LOOP
    i := i + 1;
    v_take := least(v_remaining[i], v_left);
    UPDATE ledger.grants SET remaining_milli = remaining_milli - v_take WHERE id = v_lots[i];
    INSERT INTO ledger.draws (tx_id, grant_id, amount_milli) VALUES (v_tx, v_lots[i], v_take);
    v_left := v_left - v_take;
  END LOOP;
  UPDATE ledger.wallets SET balance_milli = balance_milli - v_amount, updated_at = now()
   WHERE user_id = p_user
  RETURNING held_milli, debt_milli INTO v_held, v_debt;
  v_available := v_available - v_amount;
  RETURN jsonb_build_object(
    'status', 201,
    'body', jsonb_build_object(
      'transaction_id', v_tx, 'user_id', p_user, 'app', v_app, 'amount_milli', v_amount,
      'description', op->>'description', 'reference', op->>'reference',
      'created_at', now(), 'available_milli', v_available, 'held_milli', v_held,
      'debt_milli', v_debt),
    'event', jsonb_build_object(
      'user_id', p_user, 'available_milli', v_available, 'held_milli', v_held,
      'debt_milli', v_debt, 'delta_milli', -v_amount, 'reason', 'debit', 'app', v_app,
      'transaction_id', v_tx));
END $$;

-- A hold, stated inline as a debit is (its lots read once, no helper calls). `p_debt`
-- as for a debit.
CREATE OR REPLACE FUNCTION ledger._op_reserve(op jsonb, p_user text, p_debt bigint)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_amount bigint := (op->>'amount')::bigint;
  v_app text := op->>'app';
  v_owner text := op->'auth'->>'owner';
  v_available bigint := 0;
  v_lots bigint[];
  v_remaining bigint[];
  v_left bigint;
  v_take bigint;
  i int := 0;
  v_hold uuid := gen_random_uuid();
  v_hold_json jsonb;
  v_tx bigint;
  v_held bigint;
  v_debt bigint;
BEGIN
  IF v_owner IS NULL THEN
    RETURN ledger._err(403, 'forbidden', 'A hold needs an owner in its authority');
  END IF;
  IF v_amount IS NULL OR v_amount <= 0 OR v_app IS NULL THEN
    RETURN ledger._err(422, 'invalid_hold', 'A hold needs a positive amount and an app');
  END IF;
  IF p_debt = 0 THEN
    SELECT COALESCE(SUM(remaining_milli), 0)::bigint,
           array_agg(id ORDER BY expires_at ASC NULLS LAST, priority DESC, id ASC),
           array_agg(remaining_milli ORDER BY expires_at ASC NULLS LAST, priority DESC, id ASC)
      INTO v_available, v_lots, v_remaining
      FROM ledger.grants
     WHERE user_id = p_user AND spendable
       AND (expires_at IS NULL OR expires_at > clock_timestamp());
  END IF;
  IF v_available < v_amount THEN
    RETURN ledger._err(402, 'insufficient_credits', 'Insufficient credits',
                       jsonb_build_object('available_milli', v_available,
                                          'required_milli', v_amount));
  END IF;
  INSERT INTO ledger.transactions (kind, user_id, app, delta_milli, amount_milli,
                                   description, reference, hold_id)
  VALUES ('reserve', p_user, v_app, -v_amount, v_amount, op->>'description',
          op->>'reference', v_hold)
  RETURNING id INTO v_tx;
  INSERT INTO ledger.postings (tx_id, account, owner, amount_milli)
  VALUES (v_tx, 'wallet', p_user, -v_amount), (v_tx, 'held', p_user, v_amount);
  INSERT INTO ledger.holds (id, user_id, app, owner, amount_milli, reference, description,
                            expires_at, reserve_tx_id)
  VALUES (v_hold, p_user, v_app, v_owner, v_amount, op->>'reference', op->>'description',
          clock_timestamp() + make_interval(secs => (op->>'ttl_seconds')::int), v_tx)
  RETURNING jsonb_build_object('id', id, 'user_id', user_id, 'app', app, 'owner', owner,
                               'amount_milli', amount_milli, 'captured_milli', captured_milli,
                               'clawed_milli', clawed_milli, 'status', status,
                               'reference', reference, 'description', description,
                               'expires_at', expires_at, 'created_at', created_at,
                               'resolved_at', resolved_at)
  INTO v_hold_json;
  -- One allocation per lot it holds from.
  v_left := v_amount;
  WHILE v_left > 0 LOOP
    i := i + 1;
    v_take := least(v_remaining[i], v_left);
    UPDATE ledger.grants SET remaining_milli = remaining_milli - v_take WHERE id = v_lots[i];
    INSERT INTO ledger.hold_allocations (hold_id, grant_id, amount_milli)
    VALUES (v_hold, v_lots[i], v_take);
    v_left := v_left - v_take;
  END LOOP;
  UPDATE ledger.wallets
     SET balance_milli = balance_milli - v_amount, held_milli = held_milli + v_amount,
         updated_at = now()
   WHERE user_id = p_user
  RETURNING held_milli, debt_milli INTO v_held, v_debt;
  v_available := v_available - v_amount;
  RETURN jsonb_build_object(
    'status', 201,
    'body', jsonb_build_object(
      'hold', v_hold_json, 'transaction_id', v_tx,
      'available_milli', v_available, 'held_milli', v_held, 'debt_milli', v_debt),
    'event', jsonb_build_object(
      'user_id', p_user, 'available_milli', v_available, 'held_milli', v_held,
      'debt_milli', v_debt, 'delta_milli', -v_amount, 'reason', 'reserve', 'app', v_app,
      'transaction_id', v_tx));
END $$;

-- One operation, its `credits.changed` event (debits and holds) left in the result as
-- `event` for the caller to write: `apply` writes it as one outbox row, `apply_batch`
-- one row for all of a batch's. `op` carries: op, user_id | hold_id | transaction_id,
-- amount (milli), app, reference, description, ...; `auth` (required, see
-- docs/ledger.md "Authority"); and for idempotency `scope`, `hash` and `key` (the header
-- key or the natural one) plus `alt_key` (the natural key when a header key was also
-- sent).
CREATE OR REPLACE FUNCTION ledger._apply(op jsonb)
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
  v_held bigint;
  v_debt bigint;
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

  SELECT held_milli, debt_milli INTO v_held, v_debt FROM ledger.wallets
   WHERE user_id = v_user FOR UPDATE;
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
      INSERT INTO ledger.idempotency_keys (scope, key, request_hash, status_code, response)
      VALUES (op->>'scope', k, op->>'hash', (v_replay->>'status')::int,
              COALESCE(v_replay->'body', jsonb_build_object('error', v_replay->'error')))
      ON CONFLICT DO NOTHING;
    END LOOP;
    RETURN v_replay;
  END IF;

  -- Only a user with an active hold has one to sweep: an active hold always holds
  -- something (fully clawed, it is `clawed`), so held_milli > 0 exactly then. An
  -- expired hold's credit comes back and settles debt first: read the debt again.
  IF v_held > 0 THEN
    PERFORM ledger._sweep_holds(v_user);
    SELECT debt_milli INTO v_debt FROM ledger.wallets WHERE user_id = v_user;
  END IF;

  CASE v_kind
    WHEN 'debit' THEN v_res := ledger._op_debit(op, v_user, v_debt);
    WHEN 'grant' THEN v_res := ledger._op_grant(op, v_user);
    WHEN 'reserve' THEN v_res := ledger._op_reserve(op, v_user, v_debt);
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
      INSERT INTO ledger.idempotency_keys (scope, key, request_hash, status_code, response)
      VALUES (op->>'scope', k, op->>'hash', v_status,
              COALESCE(v_res->'body', jsonb_build_object('error', v_res->'error')))
      ON CONFLICT DO NOTHING;
    END LOOP;
  END IF;
  IF v_auth ? 'audit' AND v_status <> 403 THEN
    INSERT INTO ledger.audit_log (tx_id, actor, reason, op, user_id, amount_milli, status)
    VALUES ((v_res->'body'->>'transaction_id')::bigint, v_auth->'audit'->>'actor',
            v_auth->'audit'->>'reason', v_kind, v_user, (op->>'amount')::bigint, v_status);
  END IF;
  RETURN v_res;
END $$;

-- One operation in the caller's transaction; its event, if any, is one outbox row.
CREATE OR REPLACE FUNCTION ledger.apply(op jsonb)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_res jsonb := ledger._apply(op);
BEGIN
  IF v_res ? 'event' THEN
    INSERT INTO ledger.outbox (id, topic, payload)
    VALUES (gen_random_uuid(), 'credits.changed', v_res->'event');
    v_res := v_res - 'event';
  END IF;
  RETURN v_res;
END $$;

-- Many operations in one transaction (group commit). First all of them in ONE
-- subtransaction: in the common case, where no operation raises, a batch pays for one
-- subtransaction instead of one per operation (each writing subtransaction takes its
-- own transaction id; past 64 of them other sessions' visibility checks slow down).
-- If an operation raises, that attempt is rolled back whole and the batch runs again
-- with each operation in its own subtransaction: a business failure is a result, and a
-- raised error (a NUL byte jsonb refuses, a constraint) becomes that operation's error
-- result while its neighbours commit. Deadlocks and serialization failures (class 40)
-- and a unique violation of an idempotency key are re-raised either way: the batcher
-- retries those.
-- The `credits.changed` events of the batch's debits and holds go into ONE outbox row,
-- the array of them in order (a batch of one: the event itself); the relay publishes
-- each as its own entry. An operation that raised left no event.
-- `ops` is json, not jsonb: json keeps text it cannot store, so the refusal happens per
-- operation, in its own block, not for the whole batch.
CREATE OR REPLACE FUNCTION ledger.apply_batch(ops json)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_out jsonb[] := '{}';
  v_events jsonb[] := '{}';
  v_op json;
  v_res jsonb;
  v_state text;
  v_msg text;
  v_done boolean := false;
BEGIN
  BEGIN
    FOR v_op IN SELECT value FROM json_array_elements(ops) LOOP
      v_res := ledger._apply(v_op::jsonb);
      IF v_res ? 'event' THEN
        v_events := array_append(v_events, v_res->'event');
        v_res := v_res - 'event';
      END IF;
      -- An array grows in place; `jsonb || jsonb` would copy the whole result each time.
      v_out := array_append(v_out, v_res);
    END LOOP;
    v_done := true;
  EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE;
    IF v_state LIKE '40%' OR v_state = '23505' THEN
      RAISE;
    END IF;
  END;
  IF NOT v_done THEN
    v_out := '{}';
    v_events := '{}';
    FOR v_op IN SELECT value FROM json_array_elements(ops) LOOP
      BEGIN
        v_res := ledger._apply(v_op::jsonb);
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
      IF v_res ? 'event' THEN
        v_events := array_append(v_events, v_res->'event');
        v_res := v_res - 'event';
      END IF;
      v_out := array_append(v_out, v_res);
    END LOOP;
  END IF;
  IF cardinality(v_events) = 1 THEN
    INSERT INTO ledger.outbox (id, topic, payload)
    VALUES (gen_random_uuid(), 'credits.changed', v_events[1]);
  ELSIF cardinality(v_events) > 1 THEN
    INSERT INTO ledger.outbox (id, topic, payload)
    VALUES (gen_random_uuid(), 'credits.changed', to_jsonb(v_events));
  END IF;
  RETURN to_jsonb(v_out);
END $$;
