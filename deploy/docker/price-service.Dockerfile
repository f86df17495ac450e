# price-service: oracle prices over HTTP with a Redis cache in front of Postgres.
#
#   docker build -f deploy/docker/price-service.Dockerfile -t markets/price-service .
#
# The build context is the repository root (see /.dockerignore). Two stages: the build stage
# has the compiler and the -dev packages; the runtime stage has only the shared libraries the
# binary links (checked by running it) and curl for the health check.

FROM debian:12 AS build
ARG DEBIAN_FRONTEND=noninteractive
# The build needs all of common/'s libraries: cm links them for both daemons.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential cmake pkg-config \
      libuv1-dev libhiredis-dev node-llhttp libwslay-dev libcjson-dev libpq-dev libssl-dev \
      liburiparser-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY CMakeLists.txt ./
COPY common/ common/
COPY price-service/ price-service/
COPY order-notifier/ order-notifier/
# Tests are not built in the image: BUILD_TESTING=OFF skips tests/ (and its cmocka dependency).
RUN cmake -S . -B /build -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF \
 && cmake --build /build -j"$(nproc)" --target price-service \
 && strip /build/price-service/price-service \
 && /build/price-service/price-service --version

FROM debian:12-slim AS runtime
ARG DEBIAN_FRONTEND=noninteractive
# Runtime libraries only (Debian 12 names); curl serves the HEALTHCHECK.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libuv1 libhiredis0.14 libcjson1 libpq5 libssl3 liburiparser1 \
      ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 markets \
 && useradd --system --uid 10001 --gid markets --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin markets
COPY --from=build /build/price-service/price-service /usr/local/bin/price-service
# Fails the build when a shared library is missing from the runtime stage.
RUN ["/usr/local/bin/price-service", "--version"]

# Numeric user so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
ENV PRICE_SERVICE_LISTEN=0.0.0.0:8080 \
    LOG_FORMAT=json
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["curl", "-fsS", "-o", "/dev/null", "--max-time", "2", "http://127.0.0.1:8080/healthz"]
# Exec form: the daemon is PID 1 and receives SIGTERM itself (graceful drain, exit 0 in 10 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/price-service"]
