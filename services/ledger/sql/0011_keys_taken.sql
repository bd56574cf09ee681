-- Ledger v9 (migration 0011): an idempotency key taken by another transaction meanwhile.
--
-- Installed by migration 0011 after 0010_grouped_debits.sql. Every function below is
-- stated in full; a function not redefined here keeps its body from the newest earlier
-- file. This file never changes once released (tests/ledger/test_sql_immutable.py).
--
-- The rule (docs/ledger.md, idempotency): a key used before with other parameters is
-- 409 `idempotency_key_reused`. An operation looks its keys up after its wallet's lock,
-- which serializes the requests of one user; but one key sent at once for two users
-- (two wallets, two locks) was looked up by both before either stored it, and both
-- applied: the second's `INSERT ... ON CONFLICT DO NOTHING` waited for the first
-- transaction, then stored nothing, silently.
--
-- What changed: `_apply` and `_apply_batch_grouped` (0009's and 0010's bodies, unchanged
-- otherwise) check what their key INSERT stored. A key not stored because another
-- transaction stored it meanwhile with other parameters raises `unique_violation`
-- (`_keys_taken`): `apply_batch` lets it through (as it always has a 23505), the whole
-- statement rolls back, and the ledger's committer runs each of its operations again
-- alone (services/ledger/batcher.py), where the lookup now finds the stored key: 409
-- for that operation, every other one applied once. The check costs nothing when the
-- INSERT stored every key (the usual case): one row count.

-- Raises unique_violation when one of the keys is stored with another request's hash.
CREATE OR REPLACE FUNCTION ledger._keys_taken(scopes text[], keys text[], hashes text[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  r record;
BEGIN
  SELECT q.scope, q.key INTO r
    FROM unnest(scopes, keys, hashes) AS q(scope, key, hash)
    JOIN ledger.idempotency_keys i ON i.scope = q.scope AND i.key = q.key
   WHERE i.request_hash <> q.hash
   LIMIT 1;
  IF FOUND THEN
    RAISE unique_violation
      USING MESSAGE = format('idempotency key %s of %s was stored meanwhile by another request',
                             r.key, r.scope);
  END IF;
END $$;

-- 0009's `_apply`, its keys' INSERT checked.
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
      IF NOT FOUND THEN  -- stored meanwhile by another transaction (0011)
        PERFORM ledger._keys_taken(ARRAY[op->>'scope'], ARRAY[k], ARRAY[op->>'hash']);
      END IF;
    END LOOP;
  END IF;
  IF v_auth ? 'audit' AND v_status <> 403 THEN
    INSERT INTO ledger.audit_log (tx_id, actor, reason, op, user_id, amount_milli, status)
    VALUES ((v_res->'body'->>'transaction_id')::bigint, v_auth->'audit'->>'actor',
            v_auth->'audit'->>'reason', v_kind, v_user, (op->>'amount')::bigint, v_status);
  END IF;
  RETURN v_res;
END $$;

-- 0010's `_apply_batch_grouped`, its run's keys' INSERT checked.
CREATE OR REPLACE FUNCTION ledger._apply_batch_grouped(
  ops json, OUT v_out jsonb[], OUT v_events jsonb[])
RETURNS record LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $$
DECLARE
  v_res jsonb;
  -- The batch as jsonb, and which of its operations may be decided in a group.
  v_ops jsonb[];
  v_grouped boolean[];
  n int;
  i int;
  j int;
  o jsonb;
  v_fall boolean;
  v_loaded boolean := false;
  v_now timestamptz;
  -- One debit.
  v_user text;
  v_who text;
  v_app text;
  v_amount bigint;
  v_scope text;
  v_hash text;
  v_keys text[];
  k text;
  x int;
  u int;
  v_last_user text;
  v_last_u int;
  v_stored bigint;
  v_linked text;
  v_replay jsonb;
  v_reused boolean;
  v_available bigint;
  v_left bigint;
  v_take bigint;
  v_tx bigint;
  -- The run's users (g_, by position in g_users): their wallets, what is spendable,
  -- the next lot to draw from, whether an expired hold needs sweeping, their place in
  -- the wallet update.
  g_users text[];
  g_held bigint[];
  g_debt bigint[];
  g_available bigint[];
  g_next int[];
  g_written int[];
  v_expired text[];
  -- The run's users, scopes and keys, read from its operations.
  r_users text[];
  r_scopes text[];
  r_keys text[];
  -- The run's lots (l_), each user's together in draw order, and their place in the
  -- lot update.
  l_ids bigint[];
  l_left bigint[];
  l_user int[];
  l_written int[];
  -- Idempotency keys known (stored, or decided earlier in the run): scope and key as
  -- one text (the scope's length first, so no two pairs give the same text).
  k_ids text[];
  k_hash text[];
  k_status int[];
  k_response jsonb[];
  -- What the run writes (w_).
  w_tx bigint[] := '{}';
  w_tx_user text[] := '{}';
  w_tx_app text[] := '{}';
  w_tx_amount bigint[] := '{}';
  w_tx_description text[] := '{}';
  w_tx_reference text[] := '{}';
  w_post_tx bigint[] := '{}';
  w_post_account text[] := '{}';
  w_post_owner text[] := '{}';
  w_post_amount bigint[] := '{}';
  w_draw_tx bigint[] := '{}';
  w_draw_lot bigint[] := '{}';
  w_draw_amount bigint[] := '{}';
  w_lots bigint[] := '{}';
  w_lot_took bigint[] := '{}';
  w_wallets text[] := '{}';
  w_wallet_spent bigint[] := '{}';
  w_key_scope text[] := '{}';
  w_key text[] := '{}';
  w_key_hash text[] := '{}';
  w_key_status int[] := '{}';
  w_key_response jsonb[] := '{}';
BEGIN
  v_out := '{}';
  v_events := '{}';
  -- The batch once as jsonb (text jsonb refuses raises here: the batch then runs one
  -- operation at a time below, as before). Converted whole, not element by element
  -- in a subquery: Postgres inlines the subquery, and converted each element again at
  -- every one of the 15 references below (80 us a debit). `grouped`: a debit whose outcome can be
  -- decided from the run's reads. The amount is checked as text, so no cast can
  -- raise; anything else goes through `_apply`.
  SELECT array_agg(s.op),
         array_agg(COALESCE(
           s.op->>'op' = 'debit'
           AND jsonb_typeof(s.op->'auth') = 'object'
           AND NOT (s.op->'auth') ? 'audit'
           AND (s.op->'auth'->>'user' = 'any' OR s.op->'auth'->>'user' LIKE 'self:%'
                OR s.op->'auth'->>'user' LIKE 'linked:%')
           AND s.op->>'user_id' IS NOT NULL
           AND s.op->>'app' IS NOT NULL
           AND s.op->>'amount' ~ '^0*[1-9][0-9]{0,17}$'
           AND ((s.op->>'key' IS NULL AND s.op->>'alt_key' IS NULL)
                OR (s.op->>'scope' IS NOT NULL AND s.op->>'hash' IS NOT NULL)),
           false))
    INTO v_ops, v_grouped
    FROM jsonb_array_elements(ops::jsonb) AS s(op);
  n := COALESCE(cardinality(v_ops), 0);
  i := 1;
  LOOP
    v_fall := i > n OR NOT v_grouped[i];
    IF NOT v_fall AND NOT v_loaded THEN
      -- The run: this operation and the grouped ones after it. Deciding a run costs
      -- about as much as two debits one by one (its reads, and the statements that
      -- write it): a run shorter than MIN_RUN goes one by one.
      j := i;
      WHILE j < n AND v_grouped[j + 1] LOOP
        j := j + 1;
      END LOOP;
      IF j - i + 1 < 3 THEN  -- MIN_RUN
        FOR p IN i .. j LOOP
          v_grouped[p] := false;
        END LOOP;
        v_fall := true;
      END IF;
    END IF;
    IF NOT v_fall THEN
      o := v_ops[i];
      v_user := o->>'user_id';
      IF NOT v_loaded THEN
        -- Read the run: its users' wallets, locked in user order (the committer's
        -- order), ...
        r_users := '{}';
        r_scopes := '{}';
        r_keys := '{}';
        FOR p IN i .. j LOOP
          r_users := array_append(r_users, v_ops[p]->>'user_id');
          FOREACH k IN ARRAY array_remove(ARRAY[v_ops[p]->>'key', v_ops[p]->>'alt_key'],
                                          NULL) LOOP
            v_scope := v_ops[p]->>'scope';
            r_scopes := array_append(r_scopes, v_scope);
            r_keys := array_append(r_keys, k);
          END LOOP;
        END LOOP;
        SELECT array_agg(w.user_id), array_agg(w.held_milli), array_agg(w.debt_milli)
          INTO g_users, g_held, g_debt
          FROM (SELECT user_id, held_milli, debt_milli FROM ledger.wallets
                 WHERE user_id = ANY (r_users)
                 ORDER BY user_id COLLATE "C"
                   FOR UPDATE) w;
        g_users := COALESCE(g_users, '{}');
        g_available := array_fill(0::bigint, ARRAY[cardinality(g_users)]);
        g_next := array_fill(NULL::int, ARRAY[cardinality(g_users)]);
        g_written := g_next;
        -- ... at one instant: which of them has an expired hold to sweep (only a
        -- user with an active hold holds something) ...
        v_now := clock_timestamp();
        v_expired := '{}';
        IF 0 < ANY (g_held) THEN
          v_expired := ARRAY(SELECT DISTINCT user_id FROM ledger.holds
                              WHERE user_id = ANY (g_users) AND status = 'active'
                                AND expires_at <= v_now);
        END IF;
        -- ... their spendable lots in the order a debit draws them (soonest-expiring,
        -- then priority, then oldest; nothing is spendable while in debt) ...
        SELECT array_agg(g.id), array_agg(g.remaining_milli), array_agg(g.ord)
          INTO l_ids, l_left, l_user
          FROM (SELECT u.ord::int AS ord, l.id, l.remaining_milli
                  FROM unnest(g_users) WITH ORDINALITY AS u(user_id, ord)
                  -- A probe of ix_grants_spendable per user. The expiry is tested in
                  -- a form no index answers: as `expires_at IS NULL OR ...` the plan
                  -- (generic, on statistics of a young table) read every spendable
                  -- lot through ix_grants_expiring, 1 ms for 3 users, 7 ms for 100.
                  CROSS JOIN LATERAL (
                    SELECT id, remaining_milli, expires_at, priority FROM ledger.grants
                     WHERE user_id = u.user_id AND spendable
                       AND COALESCE(expires_at, 'infinity') > v_now
                    OFFSET 0) l
                 ORDER BY 1, l.expires_at ASC NULLS LAST, l.priority DESC, l.id) g;
        l_written := array_fill(NULL::int, ARRAY[COALESCE(cardinality(l_ids), 0)]);
        FOR p IN 1 .. COALESCE(cardinality(l_ids), 0) LOOP
          -- Nothing is spendable while in debt.
          IF g_debt[l_user[p]] = 0 THEN
            g_available[l_user[p]] := g_available[l_user[p]] + l_left[p];
            IF g_next[l_user[p]] IS NULL THEN
              g_next[l_user[p]] := p;
            END IF;
          END IF;
        END LOOP;
        -- ... and the idempotency keys its debits carry.
        -- One probe of the primary key per (scope, key): a condition on each column
        -- (`= ANY`) was planned as a range over every key of the scope.
        SELECT array_agg(length(i.scope) || ':' || i.scope || i.key),
               array_agg(i.request_hash), array_agg(i.status_code), array_agg(i.response)
          INTO k_ids, k_hash, k_status, k_response
          FROM (SELECT DISTINCT q_scope, q_key
                  FROM unnest(r_scopes, r_keys) AS q(q_scope, q_key)) q
          JOIN LATERAL (SELECT scope, key, request_hash, status_code, response
                          FROM ledger.idempotency_keys
                         WHERE scope = q.q_scope AND key = q.q_key) i ON true;
        k_ids := COALESCE(k_ids, '{}');
        k_hash := COALESCE(k_hash, '{}');
        k_status := COALESCE(k_status, '{}');
        k_response := COALESCE(k_response, '{}');
        v_last_user := NULL;
        v_linked := NULL;
        v_loaded := true;
      END IF;
      IF v_user = v_last_user THEN
        u := v_last_u;
      ELSE
        u := array_position(g_users, v_user);
        v_last_user := v_user;
        v_last_u := u;
      END IF;
      -- A user with an expired hold: `_apply` sweeps it first.
      v_fall := v_user = ANY (v_expired);
    END IF;

    IF v_fall THEN
      -- What the run decided so far is written before anything else runs.
      IF cardinality(w_tx) > 0 THEN
        INSERT INTO ledger.transactions (id, kind, user_id, app, delta_milli, amount_milli,
                                         description, reference)
        SELECT t.id, 'debit', t.u, t.app, -t.amount, t.amount, t.description, t.reference
          FROM unnest(w_tx, w_tx_user, w_tx_app, w_tx_amount, w_tx_description,
                      w_tx_reference) AS t(id, u, app, amount, description, reference);
        INSERT INTO ledger.postings (tx_id, account, owner, amount_milli)
        SELECT * FROM unnest(w_post_tx, w_post_account, w_post_owner, w_post_amount);
        INSERT INTO ledger.draws (tx_id, grant_id, amount_milli)
        SELECT * FROM unnest(w_draw_tx, w_draw_lot, w_draw_amount);
        UPDATE ledger.grants
           SET remaining_milli = remaining_milli - w_lot_took[array_position(w_lots, id)]
         WHERE id = ANY (w_lots);
        UPDATE ledger.wallets
           SET balance_milli = balance_milli
                               - w_wallet_spent[array_position(w_wallets, user_id)],
               updated_at = now()
         WHERE user_id = ANY (w_wallets);
        w_tx := '{}'; w_tx_user := '{}'; w_tx_app := '{}'; w_tx_amount := '{}';
        w_tx_description := '{}'; w_tx_reference := '{}';
        w_post_tx := '{}'; w_post_account := '{}'; w_post_owner := '{}'; w_post_amount := '{}';
        w_draw_tx := '{}'; w_draw_lot := '{}'; w_draw_amount := '{}';
        w_lots := '{}'; w_lot_took := '{}'; w_wallets := '{}'; w_wallet_spent := '{}';
      END IF;
      IF cardinality(w_key) > 0 THEN
        INSERT INTO ledger.idempotency_keys (scope, key, request_hash, status_code, response)
        SELECT * FROM unnest(w_key_scope, w_key, w_key_hash, w_key_status, w_key_response)
        ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS v_stored = ROW_COUNT;
        IF v_stored < cardinality(w_key) THEN  -- some stored meanwhile elsewhere (0011)
          PERFORM ledger._keys_taken(w_key_scope, w_key, w_key_hash);
        END IF;
        w_key_scope := '{}'; w_key := '{}'; w_key_hash := '{}'; w_key_status := '{}';
        w_key_response := '{}';
      END IF;
      -- What is read for a run is read again after an operation of the other path.
      v_loaded := false;
      EXIT WHEN i > n;
      v_res := ledger._apply(v_ops[i]);
      IF v_res ? 'event' THEN
        v_events := array_append(v_events, v_res->'event');
        v_res := v_res - 'event';
      END IF;
      v_out := array_append(v_out, v_res);
      i := i + 1;
      CONTINUE;
    END IF;

    -- One debit, decided as `_apply` and `_op_debit` decide it.
    v_res := NULL;
    v_who := o->'auth'->>'user';
    IF v_who LIKE 'self:%' THEN
      IF substr(v_who, 6) IS DISTINCT FROM v_user THEN
        v_res := ledger._err(403, 'wrong_user', 'This principal may act only on its own user');
      END IF;
    ELSIF v_who LIKE 'linked:%' THEN
      IF v_linked IS DISTINCT FROM v_user || ' ' || v_who THEN
        PERFORM 1 FROM ledger.app_links WHERE user_id = v_user AND app = substr(v_who, 8);
        IF FOUND THEN
          v_linked := v_user || ' ' || v_who;
        ELSE
          v_res := ledger._err(403, 'user_not_linked', 'This user is not linked to the app',
                               jsonb_build_object('app', substr(v_who, 8)));
        END IF;
      END IF;
    END IF;
    IF v_res IS NULL AND u IS NULL THEN
      v_res := ledger._err(404, 'unknown_user', 'No ledger account for this user',
                           jsonb_build_object('user_id', v_user));
    END IF;
    IF v_res IS NOT NULL THEN
      -- Denied or no such user: nothing remembered, nothing written.
      v_out := array_append(v_out, v_res);
      i := i + 1;
      CONTINUE;
    END IF;

    v_keys := array_remove(ARRAY[o->>'key', o->>'alt_key'], NULL);
    v_scope := o->>'scope';
    v_hash := o->>'hash';
    v_replay := NULL;
    v_reused := false;
    FOREACH k IN ARRAY v_keys LOOP
      x := array_position(k_ids, length(v_scope) || ':' || v_scope || k);
      IF x IS NOT NULL THEN
        IF k_hash[x] <> v_hash THEN
          v_reused := true;
          EXIT;
        END IF;
        IF v_replay IS NULL THEN
          v_replay := CASE WHEN k_status[x] >= 400
                           THEN jsonb_build_object('status', k_status[x],
                                                   'error', k_response[x]->'error')
                           ELSE jsonb_build_object('status', k_status[x], 'body', k_response[x])
                      END || jsonb_build_object('replayed', true);
        END IF;
      END IF;
    END LOOP;
    IF v_reused THEN
      v_out := array_append(v_out, ledger._err(409, 'idempotency_key_reused',
        'This idempotency key or reference was used with a different request'));
      i := i + 1;
      CONTINUE;
    END IF;

    IF v_replay IS NOT NULL THEN
      v_res := v_replay;
    ELSE
      v_amount := (o->>'amount')::bigint;
      v_app := o->>'app';
      v_available := g_available[u];  -- 0 in debt: its lots were not counted
      IF v_available < v_amount THEN
        v_res := ledger._err(402, 'insufficient_credits', 'Insufficient credits',
                             jsonb_build_object('available_milli', v_available,
                                                'required_milli', v_amount));
      ELSE
        v_tx := nextval('ledger.transactions_id_seq');
        w_tx := array_append(w_tx, v_tx);
        w_tx_user := array_append(w_tx_user, v_user);
        w_tx_app := array_append(w_tx_app, v_app);
        w_tx_amount := array_append(w_tx_amount, v_amount);
        w_tx_description := array_append(w_tx_description, o->>'description');
        w_tx_reference := array_append(w_tx_reference, o->>'reference');
        w_post_tx := w_post_tx || ARRAY[v_tx, v_tx];
        w_post_account := w_post_account || ARRAY['wallet', 'spend'];
        w_post_owner := w_post_owner || ARRAY[v_user, v_app];
        w_post_amount := w_post_amount || ARRAY[-v_amount, v_amount];
        -- One draw per lot it spends, from the user's next lot on.
        v_left := v_amount;
        x := g_next[u];
        WHILE v_left > 0 LOOP
          v_take := least(l_left[x], v_left);
          l_left[x] := l_left[x] - v_take;
          w_draw_tx := array_append(w_draw_tx, v_tx);
          w_draw_lot := array_append(w_draw_lot, l_ids[x]);
          w_draw_amount := array_append(w_draw_amount, v_take);
          IF l_written[x] IS NULL THEN
            w_lots := array_append(w_lots, l_ids[x]);
            w_lot_took := array_append(w_lot_took, v_take);
            l_written[x] := cardinality(w_lots);
          ELSE
            w_lot_took[l_written[x]] := w_lot_took[l_written[x]] + v_take;
          END IF;
          v_left := v_left - v_take;
          IF l_left[x] = 0 THEN
            x := x + 1;
          END IF;
        END LOOP;
        g_next[u] := x;
        IF g_written[u] IS NULL THEN
          w_wallets := array_append(w_wallets, v_user);
          w_wallet_spent := array_append(w_wallet_spent, v_amount);
          g_written[u] := cardinality(w_wallets);
        ELSE
          w_wallet_spent[g_written[u]] := w_wallet_spent[g_written[u]] + v_amount;
        END IF;
        g_available[u] := g_available[u] - v_amount;
        v_available := g_available[u];
        v_res := jsonb_build_object(
          'status', 201,
          'body', jsonb_build_object(
            'transaction_id', v_tx, 'user_id', v_user, 'app', v_app, 'amount_milli', v_amount,
            'description', o->>'description', 'reference', o->>'reference',
            'created_at', now(), 'available_milli', v_available, 'held_milli', g_held[u],
            'debt_milli', g_debt[u]));
        v_events := array_append(v_events, jsonb_build_object(
          'user_id', v_user, 'available_milli', v_available, 'held_milli', g_held[u],
          'debt_milli', g_debt[u], 'delta_milli', -v_amount, 'reason', 'debit', 'app', v_app,
          'transaction_id', v_tx));
      END IF;
    END IF;
    -- Remembered under each of its keys not stored yet (`ON CONFLICT DO NOTHING`): the
    -- first outcome for good, a replay under the key it was not known by.
    FOREACH k IN ARRAY v_keys LOOP
      IF array_position(k_ids, length(v_scope) || ':' || v_scope || k) IS NULL THEN
        k_ids := array_append(k_ids, length(v_scope) || ':' || v_scope || k);
        k_hash := array_append(k_hash, v_hash);
        k_status := array_append(k_status, (v_res->>'status')::int);
        k_response := array_append(k_response,
          COALESCE(v_res->'body', jsonb_build_object('error', v_res->'error')));
        w_key_scope := array_append(w_key_scope, v_scope);
        w_key := array_append(w_key, k);
        w_key_hash := array_append(w_key_hash, v_hash);
        w_key_status := array_append(w_key_status, k_status[cardinality(k_status)]);
        w_key_response := array_append(w_key_response, k_response[cardinality(k_response)]);
      END IF;
    END LOOP;
    v_out := array_append(v_out, v_res);
    i := i + 1;
  END LOOP;
END $$;
