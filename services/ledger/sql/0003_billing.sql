-- Ledger v2 for billing: refunds of purchases claw credit back, and what was
-- already spent becomes a debt that later grants settle first.
--
-- Loaded after ledger_v1.sql (migration 0003). It redefines exactly two v1
-- functions, `ledger._op_grant` (settles debt) and `ledger.apply` (dispatches
-- `clawback`), and adds `ledger._op_clawback`. Everything else is v1's.
--
-- Accounts: a debt lives in the `debt` account (owner = user id), so it is double
-- entry like everything else and `wallets.debt_milli` = -SUM(debt postings):
--   clawback C, of which T is available:  wallet -T, issuance:<source> +C, debt -(C-T)
--   grant A while owing D (S = min(A, D)): issuance:<source> -A, wallet +(A-S), debt +S

ALTER TABLE ledger.wallets ADD COLUMN IF NOT EXISTS debt_milli bigint NOT NULL DEFAULT 0;
DO $$
BEGIN
  ALTER TABLE ledger.wallets
    ADD CONSTRAINT ck_wallets_debt_not_negative CHECK (debt_milli >= 0);
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

-- v2: a grant first settles the user's debt; the grant row keeps its full amount
-- with what is left as its remaining.
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
  IF v_expires IS NOT NULL AND v_expires <= now() THEN
    RETURN ledger._err(422, 'already_expired', 'expires_at is in the past');
  END IF;
  -- The wallet row is locked by ledger.apply.
  SELECT debt_milli INTO v_debt FROM ledger.wallets WHERE user_id = p_user;
  v_settle := least(v_amount, COALESCE(v_debt, 0));
  v_tx := ledger._journal('grant', p_user, op->>'app', v_source, v_amount - v_settle, v_amount,
                          op->>'description', op->>'reference', NULL, NULL,
                          ARRAY['issuance', 'wallet', 'debt'], ARRAY[v_source, p_user, p_user],
                          ARRAY[-v_amount, v_amount - v_settle, v_settle]);
  INSERT INTO ledger.grants (user_id, source, amount_milli, remaining_milli, priority,
                             expires_at, reference, tx_id)
  VALUES (p_user, v_source, v_amount, v_amount - v_settle, COALESCE((op->>'priority')::int, 0),
          v_expires, op->>'reference', v_tx)
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

-- Take back `amount` of credit issued from `source` (a refunded purchase): draw
-- what is available, the grants carrying `grant_reference` first (the refunded
-- payment's own credit), then like a debit; whatever was already spent is added
-- to the user's debt. Never fails for lack of credit: the shortfall is the debt.
CREATE OR REPLACE FUNCTION ledger._op_clawback(op jsonb, p_user text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  v_amount bigint := (op->>'amount')::bigint;
  v_source text := op->>'source';
  v_grant_ref text := op->>'grant_reference';
  v_take bigint;
  v_debt bigint;
  v_left bigint;
  v_part bigint;
  v_tx bigint;
  g record;
  v_bal jsonb;
BEGIN
  IF v_amount IS NULL OR v_amount <= 0 THEN
    RETURN ledger._err(422, 'invalid_amount', 'A clawback needs a positive amount');
  END IF;
  IF v_source IS NULL THEN
    RETURN ledger._err(422, 'source_required', 'A clawback names the source it reverses');
  END IF;
  v_take := least(v_amount, ledger._available(p_user));
  v_debt := v_amount - v_take;
  v_left := v_take;
  FOR g IN
    SELECT id, remaining_milli FROM ledger.grants
     WHERE user_id = p_user AND remaining_milli > 0
       AND (expires_at IS NULL OR expires_at > now())
     ORDER BY (v_grant_ref IS NOT NULL AND reference IS NOT DISTINCT FROM v_grant_ref) DESC,
              expires_at ASC NULLS LAST, priority DESC, id ASC
     FOR UPDATE
  LOOP
    EXIT WHEN v_left = 0;
    v_part := least(g.remaining_milli, v_left);
    UPDATE ledger.grants SET remaining_milli = remaining_milli - v_part WHERE id = g.id;
    v_left := v_left - v_part;
  END LOOP;
  IF v_left > 0 THEN
    RAISE EXCEPTION 'ledger._op_clawback: % milli-Ku short for user %', v_left, p_user;
  END IF;
  UPDATE ledger.wallets
     SET balance_milli = balance_milli - v_take, debt_milli = debt_milli + v_debt,
         updated_at = now()
   WHERE user_id = p_user;
  v_tx := ledger._journal('clawback', p_user, op->>'app', v_source, -v_take, v_amount,
                          op->>'description', op->>'reference', NULL, NULL,
                          ARRAY['wallet', 'issuance', 'debt'], ARRAY[p_user, v_source, p_user],
                          ARRAY[-v_take, v_amount, -v_debt]);
  v_bal := ledger._changed(p_user, -v_take, 'clawback', op->>'app', v_tx);
  RETURN jsonb_build_object('status', 201, 'body', jsonb_build_object(
    'transaction_id', v_tx, 'user_id', p_user, 'source', v_source, 'amount_milli', v_amount,
    'taken_milli', v_take, 'debt_added_milli', v_debt,
    'debt_milli', (SELECT debt_milli FROM ledger.wallets WHERE user_id = p_user),
    'reference', op->>'reference', 'created_at', now()) || v_bal);
END $$;

-- One operation. `op` carries: op, user_id | hold_id | transaction_id, amount (milli),
-- app, reference, description, and optionally scope/key/hash for idempotency and
-- only_user (a user token may touch only its own holds).
-- v2 (billing): adds the `clawback` operation; otherwise as in ledger_v1.sql.
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
    WHEN 'clawback' THEN v_res := ledger._op_clawback(op, v_user);
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

