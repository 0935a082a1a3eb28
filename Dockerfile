# syntax=docker/dockerfile:1
# tollgate's container image: built with the official Rust image, run on distroless "cc".
#
#   docker build -t tollgate .
#   docker run --read-only -v tollgate-data:/var/lib/tollgate -p 8081:8081 -p 9090:9090 tollgate
#
# What the runtime stage relies on is tested without a container engine (tests/container_image.rs):
# the binary's shared libraries are among those distroless cc ships, and `tollgate serve` starts
# and answers as an unprivileged user on a read-only root with only its data volume writable.

# The toolchain of rust-toolchain.toml, on Debian 12 (bookworm): the runtime image is Debian 12
# too, so the glibc the binary is linked against is the one it runs with.
ARG RUST_IMAGE=docker.io/library/rust:1.95.0-bookworm
# distroless cc for Debian 12 (glibc, libgcc_s, libstdc++, libssl3), user "nonroot" (65532).
# Pinned by tag; pin the digest your registry resolves it to (docker buildx imagetools inspect
# gcr.io/distroless/cc-debian12:nonroot) with --build-arg RUNTIME_IMAGE=...@sha256:<digest>.
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# rust-toolchain.toml names clippy and rustfmt too; a build needs neither.
ENV RUSTUP_TOOLCHAIN=1.95.0 CARGO_INCREMENTAL=0
COPY Cargo.toml Cargo.lock build.rs rust-toolchain.toml ./
COPY .cargo .cargo
COPY tests/harness/Cargo.toml tests/harness/Cargo.toml
COPY src src
COPY proto proto
COPY migrations migrations
COPY benches benches
COPY tests/harness/src tests/harness/src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tollgate \
 && install -D -m 0555 target/release/tollgate /out/usr/local/bin/tollgate
# The data volume's mount point, owned by the runtime user (distroless has no shell to mkdir).
RUN install -d -m 0700 -o 65532 -g 65532 /out/var/lib/tollgate
COPY docker/tollgate.yaml /out/etc/tollgate/tollgate.yaml

FROM ${RUNTIME_IMAGE}
COPY --from=build /out/ /
# nonroot's uid and gid, numerically, so Kubernetes' runAsNonRoot can check them.
USER 65532:65532
ENV TOLLGATE_CONFIG=/etc/tollgate/tollgate.yaml
# The embedded SQLite database; mount a volume here (the root can be read-only).
VOLUME ["/var/lib/tollgate"]
WORKDIR /var/lib/tollgate
# 8081: gRPC (ext_authz Check, ShouldRateLimit, health, access log); 9090: /healthz, /readyz,
# /metrics. The admin API, when admin_addr is set, listens on a port of its choosing.
EXPOSE 8081 9090
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["serve"]
