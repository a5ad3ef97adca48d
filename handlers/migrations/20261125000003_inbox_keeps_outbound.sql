-- The inbox row of an inbound message keeps the outbound messages it caused (its reply and
-- events, postcard-encoded; NULL when none), and the hot path no longer writes the outbox table.
--
-- The inbound message is acknowledged only once the broker confirmed every one of those
-- messages. Until then it is unacknowledged in its quorum queue, which is therefore what says
-- "maybe not published yet": after a crash, a lost channel or a stop past the grace period the
-- broker delivers it again, the gateway finds its inbox row, answers it as a duplicate and
-- publishes the kept messages again, with their stable message ids (CONTRACT.md §4, §5).
--
-- The outbox table stays for messages the broker returned (no queue bound for the recipient)
-- or refused when first published: those are inserted there, with their claim, before the
-- inbound message is acknowledged, and the sweeper retries them as before. Per message this
-- saves an outbox row (heap tuple and two index entries) and its delete.
ALTER TABLE inbox ADD COLUMN outbound bytea;

-- A message with a few recipients keeps a few KB here (each event carries the insured's
-- in-transit pseudonym, about 700 bytes). Past the default 2 KB target PostgreSQL would
-- compress the row (pglz, CPU on every insert) and move the value to the TOAST table (one more
-- heap tuple and index entry). Rows stay whole up to a page instead.
ALTER TABLE inbox SET (toast_tuple_target = 8160);
