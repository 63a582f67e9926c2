-- A least-privilege PostgreSQL role for the webhook receiver.
--
-- Run it once as the owner of the tables, after `connector migrate` (which keeps running as the
-- owner: the receiver itself never changes the schema), then give the role a password and use it
-- in the receiver's CONNECTOR_DATABASE_URL:
--
--   psql "$OWNER_URL" -f docs/receiver_role_postgresql.sql
--   psql "$OWNER_URL" -c "ALTER ROLE coherent_receiver PASSWORD '...'"
--
-- The change log is append-only for this role: it may INSERT and SELECT, never UPDATE or DELETE.
-- tests/test_security.py creates the role, runs a receiver as it and checks exactly that.

CREATE ROLE coherent_receiver LOGIN;

GRANT USAGE ON SCHEMA public TO coherent_receiver;

-- The change log: read (to recognise redeliveries) and append, nothing else.
GRANT SELECT, INSERT ON coherent_events TO coherent_receiver;
GRANT USAGE ON SEQUENCE coherent_events_seq_seq TO coherent_receiver;

-- Current state: rows are locked (SELECT ... FOR UPDATE needs UPDATE), inserted and overwritten.
-- A deleted resource keeps its row with _deleted_at set, so no DELETE here.
GRANT SELECT, INSERT, UPDATE ON
    coherent_contacts, coherent_conversations, coherent_messages, coherent_groups, coherent_attachments
    TO coherent_receiver;

-- Group members and message reactions are replaced as a whole when their parent changes.
GRANT SELECT, INSERT, DELETE ON coherent_group_members, coherent_message_reactions TO coherent_receiver;

-- /readyz reads the migration revision.
GRANT SELECT ON alembic_version TO coherent_receiver;
