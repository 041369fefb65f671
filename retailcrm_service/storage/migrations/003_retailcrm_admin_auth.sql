-- Admin authentication of the RetailCRM service (issue 4).
-- Every admin JWT carries the enterprise's token version; bumping it revokes every token issued
-- before (deleting a config does). No row = version 0.
CREATE TABLE IF NOT EXISTS retailcrm_admin_token_versions (
    enterprise_number text PRIMARY KEY,
    version           integer NOT NULL DEFAULT 0,
    revoked_at        timestamptz
);

-- One-time login links: the jti of a used login token, kept until it would have expired anyway.
CREATE TABLE IF NOT EXISTS retailcrm_admin_login_nonces (
    jti               text PRIMARY KEY,
    enterprise_number text NOT NULL,
    expires_at        timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS retailcrm_admin_login_nonces_expiry_idx
    ON retailcrm_admin_login_nonces (expires_at);
