-- TRIO gateway core data model.
-- No NISS is ever stored: insured persons are identified by their at-rest pseudonym
-- (88-character base64 of X(k·embed(NISS)), PSEUDONYMISATION.md §11 a).

-- Registered organisations and the broker user each one publishes as (CONTRACT.md §2).
CREATE TABLE organisation (
    kind        text        NOT NULL CHECK (kind IN ('oa', 'sepp', 'gp', 'rp')),
    id          text        NOT NULL,
    name        text        NOT NULL,
    broker_user text        NOT NULL UNIQUE,
    format      text        NOT NULL CHECK (format IN ('json', 'xml')),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, id)
);

-- Facts about an insured that are not access rights: death and NISS replacement.
CREATE TABLE insured (
    pseudonym   text PRIMARY KEY,
    died_on     date,
    replaced_by text
);

-- Access relations of an insured: affiliation to an OA, employment, therapeutic link to a GP,
-- registration with an RP partner. They end at valid_until (24 h unless set otherwise).
CREATE TABLE insured_relation (
    pseudonym   text        NOT NULL,
    org_kind    text        NOT NULL CHECK (org_kind IN ('oa', 'employer', 'gp', 'rp')),
    org_id      text        NOT NULL,
    valid_until timestamptz NOT NULL,
    PRIMARY KEY (pseudonym, org_kind, org_id)
);

-- An employer's affiliation with a SEPP (SEPP access goes insured → employer → SEPP).
CREATE TABLE employer_sepp (
    employer    text        NOT NULL,
    sepp        text        NOT NULL,
    valid_until timestamptz NOT NULL,
    PRIMARY KEY (employer, sepp)
);

-- One communication dossier per insured. Ids come from dossier_id_seq, allocated by the gateway
-- before the batch transaction applies its messages, so replies can carry the number.
CREATE SEQUENCE dossier_id_seq;
CREATE TABLE dossier (
    id           bigint      PRIMARY KEY,
    number       text        NOT NULL UNIQUE,
    pseudonym    text        NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- art. 8 retention clock: when art. 6 data was last added.
    last_data_at timestamptz NOT NULL DEFAULT now(),
    -- set when a NISS replacement merged this dossier into another one.
    merged_into  bigint REFERENCES dossier (id)
);

-- Trajets, identified by their owner organisation and its own reference.
-- Narrow, and updated in place on non-indexed columns so updates stay HOT.
CREATE TABLE trajet (
    owner_kind          text        NOT NULL,
    owner_id            text        NOT NULL,
    ref                 text        NOT NULL,
    dossier_id          bigint      NOT NULL REFERENCES dossier (id),
    type                text        NOT NULL,
    status              text        NOT NULL,
    version             bigint      NOT NULL,
    request_received_on date,
    start_on            date,
    end_on              date,
    consent             text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner_kind, owner_id, ref)
) WITH (fillfactor = 80);
CREATE INDEX trajet_dossier_idx ON trajet (dossier_id);

-- Dossier history («Historique»): what changed, by whom, never a NISS.
CREATE TABLE history (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dossier_id bigint      NOT NULL REFERENCES dossier (id),
    at         timestamptz NOT NULL DEFAULT now(),
    actor_kind text        NOT NULL,
    actor_id   text        NOT NULL,
    resource   text        NOT NULL,
    operation  text        NOT NULL,
    detail     jsonb
);
CREATE INDEX history_dossier_idx ON history (dossier_id, at);

-- Inbox: the outcome of every processed inbound message, keyed by the idempotency key
-- (sender broker user, message_id). Also the gateway's audit log of outcomes.
CREATE TABLE inbox (
    sender      text        NOT NULL,
    message_id  text        NOT NULL,
    type        text        NOT NULL,
    status      text        NOT NULL,
    code        text,
    detail      text,
    result      jsonb,
    dossier_id  bigint,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sender, message_id)
);

-- Outbox: replies and outbound messages committed with the outcome that caused them, published
-- by the relay with publisher confirms and deleted once confirmed. message_id is stable per
-- (event, recipient), so a re-publish after a crash carries the same id.
CREATE TABLE outbox (
    message_id     uuid        PRIMARY KEY,
    exchange       text        NOT NULL,
    routing_key    text        NOT NULL,
    type           text        NOT NULL,
    content_type   text        NOT NULL,
    correlation_id text,
    traceparent    text,
    body           bytea       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- the process that inserted the row publishes it first; after this instant any relay may.
    claimed_until  timestamptz NOT NULL,
    attempts       integer     NOT NULL DEFAULT 0
);
