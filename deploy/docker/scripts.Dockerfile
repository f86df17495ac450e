# The dev stack's Python helpers (scripts/demo_writer.py, scripts/price_feeder.py): they write
# orders and prices into Postgres so the daemons have something to serve. Debian's python3 and
# psycopg2, like the developers' machines; non-root.
#
#   docker build -f deploy/docker/scripts.Dockerfile -t markets/scripts .

FROM debian:12-slim
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-psycopg2 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 markets \
 && useradd --system --uid 10001 --gid markets --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin markets
WORKDIR /app
COPY scripts/ scripts/
USER 10001:10001
ENV PYTHONUNBUFFERED=1
# Exec form so SIGTERM reaches python; the script is chosen by the compose service's command.
ENTRYPOINT ["python3"]
CMD ["scripts/demo_writer.py"]
