-- The operator console: sign-in sessions, per-hour outcome counts with event ages, and
-- lookup of requests by requestor email.

-- A signed-in operator. The cookie holds a random id; only its SHA-256 is stored, so a
-- read of this table signs nobody in.
CREATE TABLE console_sessions (
    id_hash    text PRIMARY KEY,
    -- NULL: every workspace; otherwise the one workspace this session may see.
    scope      text,
    csrf       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX console_sessions_by_expiry ON console_sessions (expires_at);

-- Outcomes per workspace and hour (written with the ledger, in the same transaction):
-- the console's 24-hour figures and chart read ~24 small rows instead of the history.
-- age_bucket is the event's age at sync (occurred_at → Vitally's 2xx) on a fixed
-- logarithmic scale, -1 for outcomes without one.
CREATE TABLE ledger_hourly (
    workspace_id text NOT NULL,
    hour         timestamptz NOT NULL,
    outcome      text NOT NULL,
    reason       text NOT NULL,
    age_bucket   smallint NOT NULL,
    events       bigint NOT NULL,
    PRIMARY KEY (workspace_id, hour, outcome, reason, age_bucket)
);

CREATE INDEX requests_by_requestor_email
    ON requests (lower(latest_snapshot #>> '{request,requestor,email}'));
