# syntax=docker/dockerfile:1.7
# One image for every role: the role is the first argument (`consumer`, `producer`, …).
#
#   docker build -t thena-vitally .
#   docker run --rm thena-vitally config

FROM rust:1.95-slim-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the target directory between builds, so a source
# change recompiles our crates only, not the dependency graph. The binary is copied out
# because a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin thena-vitally \
    && install -m 0755 target/release/thena-vitally /usr/local/bin/thena-vitally

FROM debian:bookworm-slim AS runtime
# ca-certificates: TLS to Vitally and to managed RabbitMQ/Redis. curl: the compose
# healthchecks (Kubernetes probes do not need it).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 thena \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin thena
COPY --from=builder /usr/local/bin/thena-vitally /usr/local/bin/thena-vitally
USER 10001:10001
# Logs for a pipeline by default; override with LOG_FORMAT=pretty.
ENV LOG_FORMAT=json
# 8080: producer API (and fake-vitally). 9090: /healthz, /readyz, /metrics of every role.
EXPOSE 8080 9090
ENTRYPOINT ["thena-vitally"]
CMD ["--help"]
