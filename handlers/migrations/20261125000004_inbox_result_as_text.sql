-- The inbox's `result` is written by the gateway from serde_json (always valid JSON) and read back
-- only by the gateway, to repeat it in a duplicate's reply. As jsonb, every insert parsed it
-- again: for a trajet.upsert its ~800 characters (the insured's in-transit pseudonym), about
-- 2.7 µs per row against 1.2 as text (a 200 000-row insert on this project's machine), and
-- `json_lex` was the largest single item in PostgreSQL's profile of the 1:1 benchmark. Query it
-- with `result::jsonb`.
ALTER TABLE inbox ALTER COLUMN result TYPE text USING result::text;
