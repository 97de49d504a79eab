-- Integrations: one row per Slack workspace, the only copy of its Vitally credentials
-- (encrypted: key id + ciphertext) and of its forward-only start `established_at`.
CREATE TABLE integrations (
    workspace_id        text PRIMARY KEY,
    api_url             text NOT NULL,
    auth_key_id         text NOT NULL,
    auth_header_enc     text NOT NULL,
    -- Keyed fingerprint of (API host, auth header): one Vitally per workspace, and the
    -- key of the fleet-wide rate budget. Never the header itself.
    fingerprint         text NOT NULL,
    push_requests       boolean NOT NULL,
    update_requests     boolean NOT NULL,
    sync_threads        boolean NOT NULL,
    auto_create_fields  boolean NOT NULL,
    rate_budget_per_min integer NOT NULL CHECK (rate_budget_per_min BETWEEN 1 AND 1000),
    established_at      timestamptz NOT NULL,
    custom_object_id    text NOT NULL,
    fields              jsonb NOT NULL DEFAULT '{}',
    categories          jsonb NOT NULL DEFAULT '[]',
    fields_refreshed_at timestamptz NOT NULL DEFAULT now(),
    health              text NOT NULL DEFAULT 'healthy'
                        CHECK (health IN ('healthy', 'auth_rejected', 'object_missing')),
    health_changed_at   timestamptz NOT NULL DEFAULT now(),
    health_detail       text,
    connected_at        timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    -- Disconnect is a soft delete: the row (and `established_at`) outlive it.
    disconnected_at     timestamptz,
    -- Bumped by every change; a health change is applied only to the revision it saw.
    revision            bigint NOT NULL DEFAULT 1
);

CREATE UNIQUE INDEX integrations_one_vitally_per_workspace
    ON integrations (fingerprint) WHERE disconnected_at IS NULL;

-- History: every connect, change, pause, resume and disconnect. Never a secret.
CREATE TABLE integration_events (
    id           bigserial PRIMARY KEY,
    workspace_id text NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    actor        text NOT NULL,
    action       text NOT NULL,
    changes      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX integration_events_by_workspace ON integration_events (workspace_id, id);

-- The durable half of the version guard (Redis caches it): the newest version of each
-- request that Vitally has, so losing Redis never lets an older version win.
CREATE TABLE requests (
    workspace_id   text NOT NULL,
    request_id     bigint NOT NULL,
    synced_version bigint NOT NULL,
    synced_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, request_id)
);

-- When this deployment first ran: tells "Redis lost its data" from "first start".
CREATE TABLE fleet (
    id         boolean PRIMARY KEY DEFAULT true CHECK (id),
    started_at timestamptz NOT NULL DEFAULT now()
);
