-- Ledger v4 (migration 0005): the same money rules at a lower cost per operation.
--
-- Installed by migration 0005 after 0004_money_rules.sql. Every function below is
-- stated in full; a function not redefined here keeps its body from the newest earlier
-- file. This file never changes once released (tests/ledger/test_sql_immutable.py).
--
-- No rule changes here; docs/ledger.md ("What one debit costs") has the figures
-- (bench/ledger_sql.py). What changed:
-- * `apply_batch` ran every operation in its own subtransaction (BEGIN .. EXCEPTION).
--   Now one subtransaction per batch; only a batch in which an operation raised runs
--   again with one per operation, with the same per-operation results as before.
-- * Every draw's UPDATE of its lot wrote a new entry in each of the 3 indexes of
--   `grants`: the partial indexes' predicate `remaining_milli > 0` names the column the
--   update changes, so Postgres could not update the row in place (no HOT update).
--   The indexes now filter on `spendable`, a stored generated column (remaining_milli
--   > 0) that changes only when a lot runs out or fills again, so a draw is a HOT
--   update that writes no index entry. Every query of spendable lots says `spendable`.
-- * `_changed` read the wallet row again for `held` and `debt`; a debit or a hold
--   passes them from its own wallet UPDATE (RETURNING).
-- * `apply` looked for expired holds of the user before every operation; it now reads
--   `held_milli` with the wallet lock and looks only when the user has an active hold.
-- Migration 0005 also drops indexes and foreign keys that no rule reads (its docstring).

-- Spendable now: unexpired grants' remaining, and nothing at all while a debt is
-- outstanding. Expired credit is never spendable, swept or not. PL/pgSQL, not SQL:
-- its plans are cached per session (a SQL function is planned at every call).
-- `spendable` (remaining_milli > 0, generated) is what the lot indexes filter on.
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
   WHERE user_id = p_user AND spendable
     AND (expires_at IS NULL OR expires_at > clock_timestamp());
  RETURN v_sum;
END $$;

-- Emit credits.changed for the user. `p_available`, `p_held` and `p_debt` when the
-- caller already knows them (a debit or a hold reads them off its wallet UPDATE);
-- otherwise they are read here.
CREATE OR REPLACE FUNCTION ledger._changed(p_user text, p_delta bigint, p_reason text,
                                           p_app text, p_tx bigint,
                                           p_available bigint DEFAULT NULL,
                                           p_held bigint DEFAULT NULL,
                                           p_debt bigint DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_available bigint := COALESCE(p_available, ledger._available(p_user));
  v_held bigint := p_held;
  v_debt bigint := p_debt;
BEGIN
  IF v_held IS NULL OR v_debt IS NULL THEN
    SELECT held_milli, debt_milli INTO v_held, v_debt FROM ledger.wallets
     WHERE user_id = p_user;
  END IF;
  INSERT INTO ledger.outbox (id, topic, payload)
  VALUES (gen_random_uuid(), 'credits.changed',
          jsonb_build_object('user_id', p_user, 'available_milli', v_available,
                             'held_milli', v_held, 'debt_milli', v_debt,
                             'delta_milli', p_delta, 'reason', p_reason,
                             'app', p_app, 'transaction_id', p_tx));
  RETURN jsonb_build_object('available_milli', v_available, 'held_milli', v_held,
                            'debt_milli', v_debt);
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
     WHERE user_id = p_user AND spendable
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

CREATE OR REPLACE FUNCTION ledger._op_debit(op jsonb, p_user text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_amount bigint := (op->>'amount')::bigint;
  v_app text := op->>'app';
  v_available bigint := ledger._available(p_user);
  v_tx bigint;
  v_held bigint;
  v_debt bigint;
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
   WHERE user_id = p_user
  RETURNING held_milli, debt_milli INTO v_held, v_debt;
  v_bal := ledger._changed(p_user, -v_amount, 'debit', v_app, v_tx, v_available - v_amount,
                           v_held, v_debt);
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
  v_held bigint;
  v_debt bigint;
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
   WHERE user_id = p_user
  RETURNING held_milli, debt_milli INTO v_held, v_debt;
  v_bal := ledger._changed(p_user, -v_amount, 'reserve', v_app, v_tx,
                           v_available - v_amount, v_held, v_debt);
  RETURN jsonb_build_object('status', 201, 'body',
    jsonb_build_object('hold', ledger._hold_json(v_hold), 'transaction_id', v_tx) || v_bal);
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
     WHERE user_id = p_user AND id <> g.id AND spendable
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
  v_held bigint;
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

  SELECT held_milli INTO v_held FROM ledger.wallets WHERE user_id = v_user FOR UPDATE;
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

  -- Only a user with an active hold has one to sweep: an active hold always holds
  -- something (fully clawed, it is `clawed`), so held_milli > 0 exactly then.
  IF v_held > 0 THEN
    PERFORM ledger._sweep_holds(v_user);
  END IF;

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

-- Many operations in one transaction (group commit). First all of them in ONE
-- subtransaction: in the common case, where no operation raises, a batch pays for one
-- subtransaction instead of one per operation (each writing subtransaction takes its
-- own transaction id; past 64 of them other sessions' visibility checks slow down).
-- If an operation raises, that attempt is rolled back whole and the batch runs again
-- with each operation in its own subtransaction, as under 0004: a business failure is
-- a result, and a raised error (a NUL byte jsonb refuses, a constraint) becomes that
-- operation's error result while its neighbours commit. Deadlocks and serialization
-- failures (class 40) and a unique violation of an idempotency key are re-raised
-- either way: the batcher retries those.
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
  BEGIN
    FOR v_op IN SELECT value FROM json_array_elements(ops) LOOP
      -- An array grows in place; `jsonb || jsonb` would copy the whole result each time.
      v_out := array_append(v_out, ledger.apply(v_op::jsonb));
    END LOOP;
    RETURN to_jsonb(v_out);
  EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE;
    IF v_state LIKE '40%' OR v_state = '23505' THEN
      RAISE;
    END IF;
  END;
  v_out := '{}';
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
    v_out := array_append(v_out, v_res);
  END LOOP;
  RETURN to_jsonb(v_out);
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
     WHERE spendable AND expires_at <= clock_timestamp()
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
