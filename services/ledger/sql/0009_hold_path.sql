-- Ledger v7 (migration 0009): a hold, a capture and a release in fewer statements,
-- function calls and checks.
--
-- Installed by migration 0009 after 0007_batch_lock_order.sql. Every function below is
-- stated in full; a function not redefined here keeps its body from the newest earlier
-- file. This file never changes once released (tests/ledger/test_sql_immutable.py).
--
-- No rule changes here; docs/ledger.md ("What a hold, a capture and a release cost in
-- SQL") has the figures (bench/ledger_sql.py). What changed:
-- * A capture or a release called `_resolve_hold`, which called `_give_back` per lot
--   (each locking and reading the lot, then reading the wallet's debt again),
--   `_journal` and `_changed` (which called `_available`, which read the wallet again,
--   and wrote an outbox row of its own); `_op_resolve` then called `_hold_json` and
--   `_available` again and read the wallet twice more for the answer: about 25
--   statements and 8 PL/pgSQL calls. `_op_resolve` now states an active hold's
--   resolution inline: the hold's allocations and their lots are read ONCE (what a
--   capture may spend at this instant comes from the same read, so the check and the
--   spending decide at one instant), each lot is updated once, the wallet once (its
--   balance, held and debt together), and the hold's JSON comes from its UPDATE's
--   `RETURNING`. The wallet's debt comes from `_apply`'s locked read of the wallet, as
--   for a debit. The `credits.changed` event is returned with the result (`event`) as
--   a debit's and a hold's are: `apply_batch` writes one outbox row per batch.
--   A hold resolved before (its replay or refusal) keeps the 0004 statements.
-- * `_apply` swept a user's expired holds by calling `_sweep_holds` whenever the wallet
--   held something, that is before every capture and release, and that sweep read
--   every active hold of the user (the index named only `user_id`) to test its expiry.
--   It now asks first whether one has expired, in one probe of `ix_holds_user_active`,
--   which migration 0009 makes (user_id, expires_at), with the instant as a parameter
--   (an index can compare with a value, not with `clock_timestamp()` itself); only then
--   does it call `_sweep_holds` and read the debt again.
-- * `apply_batch`'s advance locks (0007, batches with an operation keyed by a hold or a
--   transaction, as 64 generation streams send: holds beside captures) were one query,
--   `wallets WHERE user_id IN (... UNION ...)` over three scans of the batch's JSON,
--   which Postgres planned as a hash join reading the WHOLE wallets table for every
--   such batch; and they were taken in a block of their own, so every wallet the batch
--   then updated (from another subtransaction) got a MultiXact in its old version's
--   xmax. The batch is now read once, the wallets locked by key (`= ANY`), in the
--   subtransaction that applies the operations.
-- Migration 0009 also drops the foreign keys of `holds` and `hold_allocations` (its
-- docstring): three per-row trigger checks per hold.

-- Capture or release. A capture spends only allocations whose lots are still valid at
-- this instant: asking for more than that is 409 `hold_partly_expired` (detail
-- `capturable_milli`) and leaves the hold active, so the owner may capture what is
-- capturable or release it; the lapsed part expires when the hold resolves. `p_debt`
-- is the wallet's debt, read by `_apply` with the wallet's lock.
CREATE OR REPLACE FUNCTION ledger._op_resolve(op jsonb, p_user text, p_debt bigint)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_kind text := op->>'op';
  v_hold uuid := (op->>'hold_id')::uuid;
  v_may text := op->'auth'->>'holds';
  h ledger.holds%ROWTYPE;
  v_now timestamptz;
  v_active bigint;
  v_capture bigint := 0;
  v_valid bigint;
  v_lots bigint[];
  v_parts bigint[];
  v_sources text[];
  v_lapsed boolean[];
  v_left bigint;
  v_spend bigint;
  v_rest bigint;
  v_settle bigint;
  v_debt bigint := p_debt;
  v_back bigint := 0;
  v_settled bigint := 0;
  v_grants bigint[] := '{}';
  v_spent bigint[] := '{}';
  v_accounts text[] := ARRAY['held', 'spend'];
  v_owners text[];
  v_amounts bigint[];
  v_tx bigint;
  v_hold_json jsonb;
  v_held bigint;
  v_available bigint := 0;
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
  v_active := h.amount_milli - h.clawed_milli;
  IF v_kind = 'capture' THEN
    v_capture := COALESCE((op->>'amount')::bigint, v_active);
    IF v_capture > v_active THEN
      RETURN ledger._err(422, 'capture_exceeds_hold', 'Cannot capture more than is held',
                         jsonb_build_object('held_milli', v_active,
                                            'requested_milli', v_capture));
    END IF;
  END IF;
  -- The hold's allocations and their lots, once, in the order a capture spends them
  -- (valid lots first: soonest-expiring, then priority, then oldest, as a debit
  -- draws), with what of them is valid at this one instant. Under the wallet's lock,
  -- which every writer of the user's lots and holds takes first, none of them changes
  -- before the updates below (each UPDATE locks its row anyway).
  v_now := clock_timestamp();
  SELECT array_agg(grant_id ORDER BY lapsed, expires_at ASC NULLS LAST, priority DESC, grant_id),
         array_agg(amount_milli ORDER BY lapsed, expires_at ASC NULLS LAST, priority DESC, grant_id),
         array_agg(source ORDER BY lapsed, expires_at ASC NULLS LAST, priority DESC, grant_id),
         array_agg(lapsed ORDER BY lapsed, expires_at ASC NULLS LAST, priority DESC, grant_id),
         COALESCE(SUM(amount_milli) FILTER (WHERE NOT lapsed), 0)::bigint
    INTO v_lots, v_parts, v_sources, v_lapsed, v_valid
    FROM (SELECT ha.grant_id, ha.amount_milli, g.source, g.expires_at, g.priority,
                 (g.expires_at IS NOT NULL AND g.expires_at <= v_now) AS lapsed
            FROM ledger.hold_allocations ha JOIN ledger.grants g ON g.id = ha.grant_id
           WHERE ha.hold_id = v_hold AND ha.amount_milli > 0) a;
  IF v_capture > v_valid THEN
    RETURN ledger._err(409, 'hold_partly_expired',
                       'Part of the credit in this hold expired; capture at most the rest',
                       jsonb_build_object('capturable_milli', v_valid,
                                          'requested_milli', v_capture));
  END IF;
  v_owners := ARRAY[h.user_id, h.app];
  v_amounts := ARRAY[-v_active, v_capture];
  -- Spend the capture from the valid lots; give each lot's rest back: to `expired` if
  -- the lot has lapsed, else to the debt first, then to the lot's remaining.
  v_left := v_capture;
  FOR i IN 1 .. COALESCE(cardinality(v_lots), 0) LOOP
    v_spend := CASE WHEN v_lapsed[i] THEN 0 ELSE least(v_parts[i], v_left) END;
    IF v_spend > 0 THEN
      v_grants := v_grants || v_lots[i];
      v_spent := v_spent || v_spend;
      v_left := v_left - v_spend;
    END IF;
    v_rest := v_parts[i] - v_spend;
    IF v_rest > 0 THEN
      IF v_lapsed[i] THEN
        UPDATE ledger.grants SET expired_milli = expired_milli + v_rest WHERE id = v_lots[i];
        v_accounts := v_accounts || 'expired'::text;
        v_owners := v_owners || v_sources[i];
        v_amounts := v_amounts || v_rest;
      ELSE
        v_settle := least(v_rest, v_debt);
        UPDATE ledger.grants
           SET remaining_milli = remaining_milli + v_rest - v_settle,
               settled_milli = settled_milli + v_settle
         WHERE id = v_lots[i];
        v_debt := v_debt - v_settle;
        v_back := v_back + v_rest - v_settle;
        v_settled := v_settled + v_settle;
      END IF;
    END IF;
  END LOOP;
  IF v_left > 0 THEN
    RAISE EXCEPTION 'ledger._op_resolve: % milli-Ku of hold % not capturable', v_left, v_hold;
  END IF;
  v_accounts := v_accounts || ARRAY['wallet', 'debt'];
  v_owners := v_owners || ARRAY[h.user_id, h.user_id];
  v_amounts := v_amounts || ARRAY[v_back, v_settled];
  UPDATE ledger.wallets
     SET balance_milli = balance_milli + v_back, held_milli = held_milli - v_active,
         debt_milli = debt_milli - v_settled, updated_at = now()
   WHERE user_id = h.user_id
  RETURNING held_milli, debt_milli INTO v_held, v_debt;
  INSERT INTO ledger.transactions (kind, user_id, app, delta_milli, amount_milli,
                                   description, reference, hold_id)
  VALUES (v_kind, h.user_id, h.app, v_back, v_capture, h.description, h.reference, h.id)
  RETURNING id INTO v_tx;
  INSERT INTO ledger.postings (tx_id, account, owner, amount_milli)
  SELECT v_tx, a, o, m FROM unnest(v_accounts, v_owners, v_amounts) AS t(a, o, m) WHERE m <> 0;
  IF cardinality(v_grants) > 0 THEN
    INSERT INTO ledger.draws (tx_id, grant_id, amount_milli)
    SELECT v_tx, gid, amt FROM unnest(v_grants, v_spent) AS t(gid, amt);
  END IF;
  UPDATE ledger.holds
     SET status = CASE WHEN v_kind = 'capture' THEN 'captured' ELSE 'released' END,
         captured_milli = v_capture, resolved_at = now(), resolve_tx_id = v_tx
   WHERE id = v_hold
  RETURNING jsonb_build_object('id', id, 'user_id', user_id, 'app', app, 'owner', owner,
                               'amount_milli', amount_milli, 'captured_milli', captured_milli,
                               'clawed_milli', clawed_milli, 'status', status,
                               'reference', reference, 'description', description,
                               'expires_at', expires_at, 'created_at', created_at,
                               'resolved_at', resolved_at)
  INTO v_hold_json;
  -- Spendable now: nothing while a debt is outstanding.
  IF v_debt = 0 THEN
    SELECT COALESCE(SUM(remaining_milli), 0)::bigint INTO v_available FROM ledger.grants
     WHERE user_id = h.user_id AND spendable
       AND (expires_at IS NULL OR expires_at > clock_timestamp());
  END IF;
  RETURN jsonb_build_object(
    'status', 200,
    'body', jsonb_build_object(
      'hold', v_hold_json, 'transaction_id', v_tx,
      'available_milli', v_available, 'held_milli', v_held, 'debt_milli', v_debt),
    'event', jsonb_build_object(
      'user_id', h.user_id, 'available_milli', v_available, 'held_milli', v_held,
      'debt_milli', v_debt, 'delta_milli', v_back, 'reason', v_kind, 'app', h.app,
      'transaction_id', v_tx));
END $$;

-- One operation, its `credits.changed` event (debits, holds, captures and releases)
-- left in the result as `event` for the caller to write: `apply` writes it as one
-- outbox row, `apply_batch` one row for all of a batch's. `op` carries: op, user_id |
-- hold_id | transaction_id, amount (milli), app, reference, description, ...; `auth`
-- (required, see docs/ledger.md "Authority"); and for idempotency `scope`, `hash` and
-- `key` (the header key or the natural one) plus `alt_key` (the natural key when a
-- header key was also sent).
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
  v_now timestamptz;
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
  -- something (fully clawed, it is `clawed`), so held_milli > 0 exactly then. Whether
  -- one has expired is one probe of ix_holds_user_active (user_id, expires_at), the
  -- instant passed as a value the index can compare with. An expired hold's credit
  -- comes back and settles debt first: read the debt again.
  IF v_held > 0 THEN
    v_now := clock_timestamp();
    PERFORM 1 FROM ledger.holds
     WHERE user_id = v_user AND status = 'active' AND expires_at <= v_now
     LIMIT 1;
    IF FOUND THEN
      PERFORM ledger._sweep_holds(v_user);
      SELECT debt_milli INTO v_debt FROM ledger.wallets WHERE user_id = v_user;
    END IF;
  END IF;

  CASE v_kind
    WHEN 'debit' THEN v_res := ledger._op_debit(op, v_user, v_debt);
    WHEN 'grant' THEN v_res := ledger._op_grant(op, v_user);
    WHEN 'reserve' THEN v_res := ledger._op_reserve(op, v_user, v_debt);
    WHEN 'capture', 'release' THEN v_res := ledger._op_resolve(op, v_user, v_debt);
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

-- Many operations in one transaction (group commit). First the wallets of every user
-- the batch names are locked, in user order, when the batch holds an operation keyed
-- by a hold or a transaction (migration 0007: the committer already sends every other
-- batch sorted by user, in this same byte order). Then all of them in ONE
-- subtransaction: in the common case, where no operation raises, a batch pays for one
-- subtransaction instead of one per operation (each writing subtransaction takes its
-- own transaction id; past 64 of them other sessions' visibility checks slow down).
-- If an operation raises, that attempt is rolled back whole and the batch runs again
-- with each operation in its own subtransaction: a business failure is a result, and a
-- raised error (a NUL byte jsonb refuses, a constraint) becomes that operation's error
-- result while its neighbours commit. Deadlocks and serialization failures (class 40)
-- and a unique violation of an idempotency key are re-raised either way: the batcher
-- retries those.
-- The `credits.changed` events of the batch's debits, holds, captures and releases go
-- into ONE outbox row, the array of them in order (a batch of one: the event itself);
-- the relay publishes each as its own entry. An operation that raised left no event.
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
  v_users text[];
  v_holds uuid[];
  v_txs bigint[];
BEGIN
  -- The users whose wallets the batch locks in advance (migration 0007), when it holds
  -- an operation keyed by a hold or a transaction. Those keys are looked for in the
  -- text, and first: parsing the batch's JSON for them cost 5 % of a debit. The batch
  -- is read once; the holds' and the transactions' users are looked up by key. A value
  -- that cannot be read here (text jsonb refuses) leaves the batch without advance
  -- locks: each operation still locks its own wallet, and fails alone below if it must.
  -- This block only reads: its subtransaction takes no transaction id.
  IF (strpos(ops::text, '"hold_id"') > 0 OR strpos(ops::text, '"transaction_id"') > 0)
     AND json_array_length(ops) > 1
  THEN
    BEGIN
      SELECT array_agg(e->>'user_id') FILTER (WHERE e->>'user_id' IS NOT NULL),
             array_agg((e->>'hold_id')::uuid) FILTER (WHERE e->>'hold_id' ~
               '^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$'),
             array_agg((e->>'transaction_id')::bigint)
               FILTER (WHERE e->>'transaction_id' ~ '^[0-9]{1,18}$')
        INTO v_users, v_holds, v_txs
        FROM json_array_elements(ops) e;
      v_users := COALESCE(v_users, '{}')
                 || ARRAY(SELECT user_id FROM ledger.holds WHERE id = ANY (v_holds))
                 || ARRAY(SELECT user_id FROM ledger.transactions WHERE id = ANY (v_txs));
    EXCEPTION WHEN OTHERS THEN
      GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE;
      IF v_state LIKE '40%' THEN
        RAISE;
      END IF;
      v_users := NULL;
    END;
  END IF;
  BEGIN
    -- The advance locks, taken by key (`= ANY`: one index probe per wallet; 0007's
    -- `IN (... UNION ...)` was planned as a hash join that read the whole wallets table
    -- for every such batch) and in the same subtransaction as the operations: a row
    -- locked by one subtransaction and updated by another gets a MultiXact in its xmax
    -- (0007 took them in a block of their own, so every wallet such a batch updated
    -- got one).
    IF v_users IS NOT NULL THEN
      PERFORM 1 FROM ledger.wallets WHERE user_id = ANY (v_users)
       ORDER BY user_id COLLATE "C"
         FOR UPDATE;
    END IF;
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
    -- The attempt's locks went with it: the same advance locks again, for the retry
    -- (in a block of their own, as 0007 took them: this path is rare). If they fail,
    -- each operation still locks its own wallet.
    IF v_users IS NOT NULL THEN
      BEGIN
        PERFORM 1 FROM ledger.wallets WHERE user_id = ANY (v_users)
         ORDER BY user_id COLLATE "C"
           FOR UPDATE;
      EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE;
        IF v_state LIKE '40%' THEN
          RAISE;
        END IF;
      END;
    END IF;
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
