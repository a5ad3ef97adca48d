-- The relay's sweeper looks every second for outbox rows whose claim expired
-- (WHERE claimed_until < now()). Rows live for milliseconds (inserted, published, deleted), so
-- under load the table holds mostly dead tuples between autovacuum runs: without an index each
-- sweep read the whole bloated heap (over a second per sweep, and the buffer cache trashed, in
-- the benchmark's backlog run). With it a sweep visits only expired entries; dead ones are
-- marked killed in the index on first visit.
CREATE INDEX outbox_claimed_until_idx ON outbox (claimed_until);
