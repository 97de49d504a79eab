-- The parked set: one row per parked message, drained from the parked queue by the
-- replayer (insert, commit, then ack). Nothing browses RabbitMQ any more: `dlq`, the
-- admin API and the console read and page this table.
CREATE TABLE dead_letters (
    -- Stable: what `dlq show 12`, the API and the console name a dead letter by.
    id                   bigserial PRIMARY KEY,
    -- Identity of the parked message (message id, body, failure headers; not what
    -- RabbitMQ changes on a redelivery): a redelivered message never makes a second row.
    fingerprint          text NOT NULL UNIQUE,
    event_id             text,
    workspace_id         text,
    request_id           bigint,
    version              bigint,
    reason               text NOT NULL,
    class                text,
    attempts             integer NOT NULL DEFAULT 0,
    first_failure        timestamptz NOT NULL,
    parked_at            timestamptz NOT NULL,
    -- Already scrubbed of credentials and cut to 512 characters by whoever failed it.
    last_error           text NOT NULL DEFAULT '',
    original_exchange    text NOT NULL,
    original_routing_key text NOT NULL,
    -- Headers for people (x-thena-* failure headers, x-death, ...); never a secret.
    headers              jsonb NOT NULL DEFAULT '{}',
    -- The AMQP properties exactly (json keeps them verbatim), for a faithful replay.
    properties           json NOT NULL,
    -- NULL once purged: the event is gone, its metadata stays for the audit.
    body                 bytea,
    state                text NOT NULL DEFAULT 'parked'
                         CHECK (state IN ('parked', 'replayed', 'purged')),
    state_by             text,
    state_at             timestamptz,
    state_why            text,
    stored_at            timestamptz NOT NULL DEFAULT now()
);

-- Keyset pages (`id > cursor ORDER BY id`) of the parked set, whole or by filter.
CREATE INDEX dead_letters_parked ON dead_letters (id) WHERE state = 'parked';
CREATE INDEX dead_letters_parked_by_workspace
    ON dead_letters (workspace_id, id) WHERE state = 'parked';
CREATE INDEX dead_letters_parked_by_reason ON dead_letters (reason, id) WHERE state = 'parked';
-- The count and oldest age behind the parked-messages alerts.
CREATE INDEX dead_letters_parked_at ON dead_letters (parked_at) WHERE state = 'parked';
-- A request's dead letters, whatever their state; `dlq show <event id>`.
CREATE INDEX dead_letters_by_request ON dead_letters (workspace_id, request_id, id);
CREATE INDEX dead_letters_by_event ON dead_letters (event_id, id);
-- Replayed and purged rows are pruned after a while.
CREATE INDEX dead_letters_settled ON dead_letters (state_at) WHERE state <> 'parked';

-- Who replayed or purged what, when and why; dry runs too.
CREATE TABLE dead_letter_audit (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    actor        text NOT NULL,
    action       text NOT NULL CHECK (action IN ('replay', 'purge')),
    why          text NOT NULL DEFAULT '',
    -- The filter's workspace (NULL: fleet-wide), so a workspace sees its own trail.
    workspace_id text,
    filter       jsonb NOT NULL,
    dry_run      boolean NOT NULL,
    rate_per_sec double precision,
    matched      bigint NOT NULL,
    done         bigint NOT NULL DEFAULT 0,
    failed       bigint NOT NULL DEFAULT 0,
    -- NULL while a replay runs (or if its process died: run it again).
    finished_at  timestamptz,
    error        text
);
CREATE INDEX dead_letter_audit_by_workspace ON dead_letter_audit (workspace_id, id);
