-- The state epoch: a counter every change to the rows a batch reads besides trajets and the
-- inbox (organisations, insured facts, relations, employer affiliations, dossiers) moves, in the
-- transaction that makes the change. A gateway process keeps what it loaded for an insured
-- across batches, tagged with the epoch it was read at, and uses it only while a batch's load
-- (under the batch's locks, in the same snapshot as its other reads) still reads that epoch:
-- a change committed by any writer — another gateway process, a hand-run fix, retention — is
-- then never missed, because it moved the epoch in the same commit.
--
-- Statement-level triggers, so every writer moves it, not only the gateway's own code. They take
-- the one row's lock until commit, which orders the (rare) transactions that change those tables;
-- the hot path (trajets, history, inbox, outbox) does not touch it.
CREATE TABLE state_epoch (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    epoch    bigint  NOT NULL
);
INSERT INTO state_epoch (epoch) VALUES (0);

CREATE FUNCTION move_state_epoch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE state_epoch SET epoch = epoch + 1;
    RETURN NULL;
END
$$;

-- One trigger per table a cached view is made of: <table>_moves_state_epoch.
DO $$
DECLARE
    source text;
BEGIN
    FOREACH source IN ARRAY ARRAY['organisation', 'insured', 'insured_relation', 'employer_sepp',
                                  'dossier'] LOOP
        EXECUTE format('CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %I '
                       'FOR EACH STATEMENT EXECUTE FUNCTION move_state_epoch()',
                       source || '_moves_state_epoch', source);
    END LOOP;
END
$$;
