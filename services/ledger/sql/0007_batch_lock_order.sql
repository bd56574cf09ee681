-- Ledger v6 (migration 0007): a batch locks every wallet it touches, in one order,
-- before it applies anything.
--
-- Installed by migration 0007 after 0006_debit_path.sql. Every function below is stated
-- in full; a function not redefined here keeps its body from the newest earlier file.
-- This file never changes once released (tests/ledger/test_sql_immutable.py).
--
-- Why: the group committer sorts a batch by its operations' keys, the user for a debit
-- or a hold but the hold's id for a capture or a release (it does not know that hold's
-- user). Two batches could so take two users' wallet locks in opposite orders: a
-- generation's capture for user A beside a hold for user B in one batch, the reverse in
-- another. Postgres breaks such a deadlock after `deadlock_timeout` (1 s) by failing one
-- statement, which the committer then retries operation by operation: no money is
-- wrong, but every operation in both batches waits a second (seen under
-- bench/generation.py's 64 streams). Now `apply_batch`, when a batch holds an operation
-- keyed by a hold or a transaction, first locks the wallets of every user its
-- operations name (the hold's or the refunded transaction's user looked up), in one
-- statement, in byte order of the user id (`COLLATE "C"`); every other batch comes
-- sorted by user in that same order from the committer (a row lock writes the row: it is
-- not taken twice where it is not needed). Batches so take their locks in one order and
-- cannot deadlock with each other. No rule changes.

-- Many operations in one transaction (group commit). First the wallets of every user
-- the batch names are locked, in user order (above). Then all of them in ONE
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
  -- The wallets of every user the batch names, locked in one order before anything
  -- else, when the batch holds an operation keyed by a hold or a transaction: the
  -- committer already sends every other batch sorted by user, in this same byte order.
  -- (Those keys are looked for in the text, and first: parsing the batch's JSON for
  -- them cost 5 % of a debit.) A value that cannot be read here (text jsonb refuses, an
  -- id that does not parse) leaves the batch without advance locks: each operation
  -- still locks its own wallet, and fails alone below if it must.
  IF (strpos(ops::text, '"hold_id"') > 0 OR strpos(ops::text, '"transaction_id"') > 0)
     AND json_array_length(ops) > 1
  THEN
    BEGIN
      PERFORM 1 FROM ledger.wallets
       WHERE user_id IN (
               SELECT e->>'user_id' FROM json_array_elements(ops) e
             UNION
               SELECT h.user_id FROM ledger.holds h
                WHERE h.id IN (SELECT (e->>'hold_id')::uuid FROM json_array_elements(ops) e
                                WHERE e->>'hold_id' ~ '^[0-9a-fA-F-]{32,36}$')
             UNION
               SELECT t.user_id FROM ledger.transactions t
                WHERE t.id IN (SELECT (e->>'transaction_id')::bigint
                                 FROM json_array_elements(ops) e
                                WHERE e->>'transaction_id' ~ '^[0-9]{1,18}$'))
       ORDER BY user_id COLLATE "C"
         FOR UPDATE;
    EXCEPTION WHEN OTHERS THEN
      GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE;
      IF v_state LIKE '40%' THEN
        RAISE;
      END IF;
    END;
  END IF;
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
