# syntax=docker/dockerfile:1
# One of the workspace's services as a container image, chosen by PACKAGE:
#   sluice-mock   the mock OpenAI / Anthropic / DeepSeek / Gemini providers
#   sluice-quota  the quota service (global limits, decided in Redis; stateless)
# Used by envoy/docker-compose.yaml and, pushed to a registry, by envoy/istio/10-quota.yaml.
# Build context: the repository root, e.g.
#   docker build --build-arg PACKAGE=sluice-quota -t sluice-quota .
# The image runs the binary; give it its flags as the container's command.

FROM rust:1-slim-bookworm AS build
ARG PACKAGE=sluice-mock
WORKDIR /src
# Cargo loads the whole workspace (members ".", "mock", "bench/noop", "quota", "relay") even for one
# package, and sluice-quota depends on the sluice crate: every member's manifest and declared
# targets (src/lib.rs, benches/hot_paths.rs, ...) must be here, and Cargo.lock for --locked.
# tests/deploy/check_compose.py replays these COPY lines and runs `cargo fetch --locked` on the
# result, so a new member or target missing here fails CI.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY bench/noop ./bench/noop
COPY mock ./mock
COPY quota ./quota
COPY relay ./relay
# Only PACKAGE is compiled; the caches keep rebuilds (e.g. after src/ changes) cheap.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release -p "$PACKAGE" --locked \
 && cp "target/release/$PACKAGE" /usr/local/bin/service

FROM debian:bookworm-slim
COPY --from=build /usr/local/bin/service /usr/local/bin/service
RUN groupadd --system --gid 10001 sluice \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin sluice
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/service"]
