# syntax=docker/dockerfile:1
# paseo-relay container image.
#
#   docker build -t paseo-relay .
#   docker run -d --name paseo-relay -p 8080:8080 --stop-timeout 20 paseo-relay
#
# The build uses BuildKit cache mounts (BuildKit is the default builder since Docker 23).
# See the README, section "Docker", for configuration, TLS and stopping.

# ---- build ----
FROM rust:1-bookworm AS build

# pingora-core builds zlib-ng with cmake (the same package `make deps` installs).
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# The cargo registry and target/ are cache mounts, so a rebuild after a source change reuses
# the compiled dependencies. target/ is not part of the image layer, hence the copy out.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p proxy-bin \
    && cp target/release/paseo-relay /usr/local/bin/paseo-relay

# ---- runtime ----
FROM debian:bookworm-slim

# curl is for the HEALTHCHECK below.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 paseo \
    && useradd --system --uid 10001 --gid paseo --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin paseo

COPY --from=build /usr/local/bin/paseo-relay /usr/local/bin/paseo-relay
# For reference only: the relay reads a configuration file only when given one
# (-c FILE or PASEO_CONFIG=FILE), e.g. one mounted at /etc/paseo-relay/paseo-relay.yaml.
COPY conf/paseo-relay.example.yaml /usr/share/doc/paseo-relay/paseo-relay.example.yaml

# The relay listens on 0.0.0.0:8080 (plain ws://) unless told otherwise. No --listen here, so
# PASEO_LISTEN and the file's `listen` still apply (flags would override both).
# pid_file and upgrade_sock default to /tmp, which this user can write.
EXPOSE 8080

# Checks a plain listener on 127.0.0.1:8080. When the relay serves TLS, keep one plain listener
# there for it (e.g. PASEO_LISTEN=0.0.0.0:8443,tcp://127.0.0.1:8080), or override the check.
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/health || exit 1

# SIGTERM is the graceful stop: every WebSocket gets close 1001 and the relay exits within
# grace_period_seconds (10 s by default). Docker's default stop timeout is also 10 s, so run
# with --stop-timeout 20 (compose: stop_grace_period: 20s).
STOPSIGNAL SIGTERM

# uid/gid 10001 (paseo); numeric so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/paseo-relay"]
