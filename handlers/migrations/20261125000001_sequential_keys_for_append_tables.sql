-- Every message appends a history line and an outbox row; each index on those tables is one more
-- B-tree insertion (and WAL record) per message. Keep only the indexes a reader needs.

-- History is read per dossier in the order it was written: (dossier_id, id) is both its identity
-- and that reading order, so the separate (dossier_id, at) index goes.
ALTER TABLE history DROP CONSTRAINT history_pkey;
DROP INDEX history_dossier_idx;
ALTER TABLE history ADD PRIMARY KEY (dossier_id, id);

-- Outbox rows are deleted by the relay that inserted them, which knows their ids from the insert:
-- a sequential id, whose index insertions all land on the rightmost page, replaces the random
-- UUID key (a B-tree insertion into a random page per message). The sweeper keeps its
-- claimed_until index, so a sweep visits only expired rows however many wait for a recipient's
-- queue. message_id stays the stable wire id; a duplicate's reply may sit in the outbox twice,
-- and is then published twice with one message_id, which is what consumers de-duplicate on
-- (CONTRACT.md §4).
ALTER TABLE outbox DROP CONSTRAINT outbox_pkey;
ALTER TABLE outbox ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY;
