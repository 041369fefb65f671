-- Issue 7: RetailCRM users' statuses as RetailCRM reports them through changeUserStatusUrl
-- (/retailcrm/status). Smart redirect reads them to avoid ringing a manager who is away.

CREATE TABLE IF NOT EXISTS retailcrm_user_status (
    enterprise_number text NOT NULL,
    retailcrm_user_id text NOT NULL,
    code              text,
    status            text NOT NULL CHECK (status IN ('free', 'busy', 'dinner', 'break')),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (enterprise_number, retailcrm_user_id)
);
