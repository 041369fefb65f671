-- The platform's own tables (platform-facts.md §3). Production databases already have them;
-- dev and test databases get them here. Nothing is created or changed when they exist,
-- except columns this project relies on, which are added only when missing.

CREATE TABLE IF NOT EXISTS enterprises (
    id                  serial PRIMARY KEY,
    number              text NOT NULL UNIQUE,
    name                text NOT NULL DEFAULT '',
    name2               text UNIQUE,
    secret              text,
    ip                  text,
    active              boolean NOT NULL DEFAULT true,
    is_enabled          boolean NOT NULL DEFAULT true,
    integrations_config jsonb DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS enterprises_secret_idx ON enterprises (secret);

CREATE TABLE IF NOT EXISTS integration_logs (
    id                bigserial PRIMARY KEY,
    enterprise_number text NOT NULL,
    integration_type  text NOT NULL,
    event_type        text NOT NULL,
    request_data      jsonb,
    response_data     jsonb,
    status            text NOT NULL,
    error_message     text,
    created_at        timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE integration_logs ADD COLUMN IF NOT EXISTS call_unique_id text;
CREATE INDEX IF NOT EXISTS integration_logs_journal_idx
    ON integration_logs (enterprise_number, integration_type, created_at DESC);
CREATE INDEX IF NOT EXISTS integration_logs_call_idx
    ON integration_logs (enterprise_number, call_unique_id) WHERE call_unique_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS users (
    id                serial PRIMARY KEY,
    enterprise_number text NOT NULL,
    first_name        text NOT NULL DEFAULT '',
    last_name         text NOT NULL DEFAULT '',
    patronymic        text NOT NULL DEFAULT '',
    email             text
);

CREATE TABLE IF NOT EXISTS user_internal_phones (
    id                serial PRIMARY KEY,
    user_id           integer REFERENCES users (id) ON DELETE SET NULL,
    phone_number      text NOT NULL,
    enterprise_number text NOT NULL
);
CREATE INDEX IF NOT EXISTS user_internal_phones_lookup_idx
    ON user_internal_phones (enterprise_number, phone_number);
