-- History lines are appended by the message that changes a dossier, in the transaction that
-- created or loaded that dossier, and move with it when dossiers merge: the foreign key to
-- dossier checked nothing the gateway does not already guarantee, and it cost every history
-- line a trigger query and a row lock on its dossier (a WAL record per message, and a
-- multixact when two batches touch one dossier). Retention deletes a dossier's history with it.
ALTER TABLE history DROP CONSTRAINT history_dossier_id_fkey;
