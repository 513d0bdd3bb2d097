# syntax=docker/dockerfile:1
#
# Cairn's container images, one target each, from one build of the
# workspace:
#
#   operator  cairn-operator (the controllers, and `announce` beside agents)
#   agent     cairn-agent and the `cairn` CLI, with the tools a node needs
#   csi       cairn-csi (controller and node), with the same node tools
#
# Build one image for the machine's own platform:
#
#   docker build --target agent -t ghcr.io/cairn-storage/cairn-agent:dev .
#
# Build and push all three for amd64 and arm64 (a buildx builder with the
# docker-container driver; see docs/kubernetes.md):
#
#   for t in operator agent csi; do
#     docker buildx build --platform linux/amd64,linux/arm64 --target "$t" \
#       -t "ghcr.io/cairn-storage/cairn-$t:0.1.0" --push .
#   done
#
# The Rust build runs on the build machine's own platform and cross-compiles
# to the target's (no emulation of rustc), so a multi-platform build costs
# about two native builds. The runtime images are Debian slim, matching the
# builder's glibc.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------------------
# Builder: the host's platform, cross-compiling to TARGETPLATFORM.
FROM --platform=$BUILDPLATFORM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
ARG TARGETARCH
WORKDIR /src

# A C cross toolchain for the crates that compile C (ring, zstd-sys) and the
# linker, only when the target's architecture differs from the builder's.
RUN set -eux; \
    case "$TARGETARCH" in \
      amd64) triple=x86_64-unknown-linux-gnu;  gnu=x86-64 ;; \
      arm64) triple=aarch64-unknown-linux-gnu; gnu=aarch64 ;; \
      *) echo "unsupported TARGETARCH=$TARGETARCH (amd64 or arm64)" >&2; exit 1 ;; \
    esac; \
    echo "$triple" > /rust-target; \
    if [ "$(dpkg --print-architecture)" != "$TARGETARCH" ]; then \
      apt-get update; \
      apt-get install -y --no-install-recommends "gcc-${gnu}-linux-gnu" "libc6-dev-${TARGETARCH}-cross"; \
      rm -rf /var/lib/apt/lists/*; \
    fi; \
    rustup target add "$triple"

ENV CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER=x86_64-linux-gnu-gcc \
    CC_x86_64_unknown_linux_gnu=x86_64-linux-gnu-gcc \
    CARGO_TERM_COLOR=never

COPY . .

# The registry and the target dir are cache mounts, so a rebuild after a
# source change recompiles only Cairn's crates. The binaries are copied out
# of the cache mount into /out, which the runtime stages read.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    set -eux; \
    triple="$(cat /rust-target)"; \
    if [ "$(dpkg --print-architecture)" = "$TARGETARCH" ]; then \
      unset CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER CC_x86_64_unknown_linux_gnu \
            CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER CC_aarch64_unknown_linux_gnu; \
    fi; \
    cargo build --release --locked --target "$triple" \
      -p cairn-agent -p cairn-operator -p cairn-csi; \
    mkdir -p /out; \
    for b in cairn-agent cairn cairn-operator cairn-csi; do \
      cp "target/$triple/release/$b" /out/; \
    done

# ---------------------------------------------------------------------------
# The operator: no tools, no root.
FROM debian:${DEBIAN_RELEASE}-slim AS operator
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates; \
    rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/cairn-operator /usr/local/bin/cairn-operator
# 65532: the conventional "nonroot" uid; the chart runs it as that user too.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/cairn-operator"]
CMD ["run"]

# ---------------------------------------------------------------------------
# What runs on storage nodes: mkfs and growfs for ext4 and xfs (e2fsprogs,
# xfsprogs), losetup, mount and blkid (mount, util-linux), fusermount3 for
# cleaning up by hand (fuse3). The agent mounts FUSE itself (mount(2)), so
# libfuse is not linked.
FROM debian:${DEBIAN_RELEASE}-slim AS node-base
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends \
      ca-certificates e2fsprogs xfsprogs util-linux mount fuse3; \
    rm -rf /var/lib/apt/lists/*

# The agent and the `cairn` CLI (handy with `kubectl exec`).
FROM node-base AS agent
COPY --from=builder /out/cairn-agent /out/cairn /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/cairn-agent"]

# The CSI driver: one binary, `cairn-csi controller` or `cairn-csi node`.
FROM node-base AS csi
COPY --from=builder /out/cairn-csi /usr/local/bin/cairn-csi
ENTRYPOINT ["/usr/local/bin/cairn-csi"]
