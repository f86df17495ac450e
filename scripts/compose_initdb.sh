# The compose dev stack's database set-up (docker-compose.yml mounts this file into the
# postgres image's /docker-entrypoint-initdb.d, which runs on the first start only, with an
# empty pgdata volume): the schema of deploy/sql in name order, then the dev stack's demo
# prices, which deploy/sql does not hold so that no real database gets them. Sourced by the
# image's entrypoint (the file is not executable); psql talks to its temporary server over
# the local socket.
for f in /markets/sql/*.sql /markets/dev_seed.sql; do
  psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" -f "$f"
done
