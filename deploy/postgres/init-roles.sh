#!/bin/sh
# Run once by the postgres image on its first start (docker-entrypoint-initdb.d), as the superuser:
# the role every unlearning process uses. It owns the database's schema (migrations need that)
# and nothing more: no superuser, no new databases or roles. The model server has no role at all.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v password="$(cat /run/secrets/postgres_unlearn_password)" <<'SQL'
CREATE ROLE unlearn LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD :'password';
ALTER DATABASE unlearning OWNER TO unlearn;
ALTER SCHEMA public OWNER TO unlearn;
REVOKE ALL ON DATABASE unlearning FROM PUBLIC;
GRANT CONNECT ON DATABASE unlearning TO unlearn;
SQL
