-- Opt-in backfill: historical snapshots an operator imports past the forward-only rule.
-- A job is one export (identified by its content, so a rerun after a crash resumes it);
-- its items are the requests it holds, each at the newest version the export has, in
-- publishing order, and — once a consumer settled it for good — its outcome.
CREATE TABLE backfill_jobs (
    id           text PRIMARY KEY,
    workspace_id text NOT NULL,
    source       text NOT NULL,
    content_hash text NOT NULL,
    rejected     integer NOT NULL DEFAULT 0,
    -- Items [0, published) are confirmed on the broker: a rerun starts after them.
    published    integer NOT NULL DEFAULT 0,
    actor        text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz,
    UNIQUE (workspace_id, content_hash)
);

CREATE TABLE backfill_items (
    job_id     text NOT NULL REFERENCES backfill_jobs (id) ON DELETE CASCADE,
    position   integer NOT NULL,
    request_id bigint NOT NULL,
    version    bigint NOT NULL,
    outcome    text,
    reason     text,
    settled_at timestamptz,
    PRIMARY KEY (job_id, request_id)
);
CREATE UNIQUE INDEX backfill_items_by_position ON backfill_items (job_id, position);
