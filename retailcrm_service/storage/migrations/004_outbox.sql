-- The durable outbox of the RetailCRM service (issue 6). An accepted event is a committed row
-- here; delivery workers in any number of instances claim due rows with FOR UPDATE SKIP LOCKED
-- and a lease that lapses when a worker dies.
--
-- One accepted event is one row; the idempotency key is unique per enterprise. `kind` is the
-- stage the row is in:
--   popup   -> telephony/call/event (dial: in/out, live hangup: hangup); expires after a TTL
--   history -> telephony/calls/upload (hangups, live or recovered); retried until delivered or dead
--   note    -> nothing is sent; kept for attribution (bridge: who answered)
-- A live hangup starts as `popup` with has_history; once its popup is settled (popup_state) it
-- moves on to `history` in place. Rows of one call are delivered in id order (a dial before its
-- hangup).

CREATE TABLE IF NOT EXISTS retailcrm_outbox (
    id                bigserial PRIMARY KEY,
    enterprise_number text        NOT NULL,
    idempotency_key   text        NOT NULL,
    kind              text        NOT NULL CHECK (kind IN ('popup', 'history', 'note')),
    has_history       boolean     NOT NULL DEFAULT false,
    popup_state       text,
    call_unique_id    text        NOT NULL,
    event_type        text        NOT NULL,
    origin            text        NOT NULL DEFAULT 'live',
    payload           json        NOT NULL,  -- stored as received (json: no re-encoding cost)
    occurred_at       timestamptz,
    state             text        NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'delivered', 'expired', 'superseded', 'dead', 'skipped')),
    due_at            timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz,
    attempts          integer     NOT NULL DEFAULT 0,
    last_error        text,
    lease_owner       text,
    lease_until       timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    CONSTRAINT retailcrm_outbox_idempotency UNIQUE (enterprise_number, idempotency_key)
);

-- The claim query: pending rows by due time.
CREATE INDEX IF NOT EXISTS retailcrm_outbox_due_idx
    ON retailcrm_outbox (due_at, id) WHERE state = 'pending';
-- Per-call ordering ("is an earlier row of this call still pending?") and attribution lookups.
CREATE INDEX IF NOT EXISTS retailcrm_outbox_call_idx
    ON retailcrm_outbox (enterprise_number, call_unique_id, id);
-- Replay of an enterprise's failed events. Partial: the intake never writes to it, and
-- delivered rows (the bulk) stay out of it.
CREATE INDEX IF NOT EXISTS retailcrm_outbox_failed_idx
    ON retailcrm_outbox (enterprise_number, created_at)
    WHERE state IN ('dead', 'expired', 'superseded', 'skipped');
-- Purge of settled rows past the retention.
CREATE INDEX IF NOT EXISTS retailcrm_outbox_finished_idx
    ON retailcrm_outbox (finished_at) WHERE state <> 'pending';

-- Delivery instances alive (heartbeat each sweep): each paces RetailCRM at 1/n of the budget,
-- so that n instances sharing one API key stay under its limits together.
CREATE TABLE IF NOT EXISTS retailcrm_delivery_instances (
    owner   text        PRIMARY KEY,
    seen_at timestamptz NOT NULL DEFAULT now()
);
