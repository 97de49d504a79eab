-- The request ledger: one row per (workspace, request) answering "where did request 135
-- go?": the latest snapshot received, the last outcome and why, the linking decision,
-- the Vitally instance, attempts; plus a bounded history of outcomes per request.
ALTER TABLE requests
    ALTER COLUMN synced_version DROP NOT NULL,
    ALTER COLUMN synced_at DROP NOT NULL,
    ALTER COLUMN synced_at DROP DEFAULT,
    ADD COLUMN latest_version  bigint,
    ADD COLUMN latest_snapshot jsonb,
    ADD COLUMN instance_id     text,
    ADD COLUMN outcome         text,
    ADD COLUMN reason          text,
    ADD COLUMN outcome_at      timestamptz,
    ADD COLUMN link            jsonb,
    ADD COLUMN attempts        integer NOT NULL DEFAULT 0,
    ADD COLUMN first_seen_at   timestamptz NOT NULL DEFAULT now();

CREATE INDEX requests_by_outcome ON requests (workspace_id, outcome, reason, outcome_at DESC);

CREATE TABLE request_events (
    id           bigserial PRIMARY KEY,
    workspace_id text NOT NULL,
    request_id   bigint NOT NULL,
    version      bigint NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    outcome      text NOT NULL,
    reason       text NOT NULL,
    detail       text
);
CREATE INDEX request_events_by_request ON request_events (workspace_id, request_id, id DESC);
