-- Admin sessions, so that one can end on the server: a session JWT carries its row's id (sid).
-- A session lives while it is used (last_seen_at within the idle limit, sliding) and never past
-- expires_at (the absolute limit); logging out sets revoked_at, so a copied cookie stops working.
CREATE TABLE IF NOT EXISTS retailcrm_admin_sessions (
    id                text PRIMARY KEY,
    enterprise_number text        NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    last_seen_at      timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz NOT NULL,
    revoked_at        timestamptz
);
CREATE INDEX IF NOT EXISTS retailcrm_admin_sessions_expiry_idx
    ON retailcrm_admin_sessions (expires_at);
