#!/bin/sh
# Writes the secrets docker-compose.yml mounts, each a fresh random value, under ./secrets/
# (ignored by git and by the image build). Run once before `docker compose up`; an existing
# secret is kept, so running it again changes nothing. Nothing here is a default password.
set -eu
cd "$(dirname "$0")/.."
umask 077
mkdir -p secrets
chmod 700 secrets

random() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
put() {  # put NAME VALUE: write secrets/NAME unless it exists; world-readable inside the 0700
         # directory, since the containers' own users (postgres, redis, minio...) read the mount
    [ -s "secrets/$1" ] && return 0
    printf '%s\n' "$2" > "secrets/$1"
    chmod 644 "secrets/$1"
}
get() { head -n 1 "secrets/$1"; }

put postgres_superuser_password "$(random)"
put postgres_unlearn_password "$(random)"
put unlearn_database_url "postgresql://unlearn:$(get postgres_unlearn_password)@postgres:5432/unlearning"
put redis_password "$(random)"
put unlearn_celery_broker "redis://:$(get redis_password)@redis:6379/0"
put minio_root_user "root-$(random | cut -c1-12)"
put minio_root_password "$(random)"
for who in worker serve; do
    put "minio_${who}_key" "unlearn-$who-$(random | cut -c1-12) $(random)"
    read -r key secret < "secrets/minio_${who}_key"
    put "aws_credentials_$who" "$(printf '[default]\naws_access_key_id = %s\naws_secret_access_key = %s' "$key" "$secret")"
done
put serve_token "$(random)"
# the Ed25519 key the worker signs model versions, manifests and receipts with, and its public
# half for the model servers and `unlearn verify` (README "Authenticity")
if [ ! -s secrets/signing_key ]; then
    openssl genpkey -algorithm ed25519 -out secrets/signing_key
    chmod 644 secrets/signing_key
fi
if [ ! -s secrets/verify_key ]; then
    openssl pkey -in secrets/signing_key -pubout -out secrets/verify_key
    chmod 644 secrets/verify_key
fi
put grafana_admin_password "$(random)"
put tombstone_key "$(random)"  # keys the erasure tombstones; lose it and erased rows could be imported again
echo "secrets written under $(pwd)/secrets (the model server's bearer token: secrets/serve_token)"
