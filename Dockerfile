# One image for both services:
#   docker run IMAGE                                   -> pve-planner serve on 0.0.0.0:50051
#   docker run -e PVE_HEALTH_ADDRESS=unix:/run/pve-reconcile/executor.sock IMAGE pve-executor run ...
# Build stage: install the package into a virtualenv (wheels only; nothing is compiled).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY common ./common
COPY planner ./planner
COPY executor ./executor
COPY opctl ./opctl
COPY journal ./journal
COPY safety ./safety
COPY hub ./hub
COPY desiredfile ./desiredfile
RUN python -m venv /opt/pve-reconcile \
 && /opt/pve-reconcile/bin/pip install --no-cache-dir --only-binary=:all: . \
 && /opt/pve-reconcile/bin/pip uninstall --yes pip

# Final stage: the virtualenv only, run as an unprivileged user, named as the units' (deploy/sysusers.d).
# Its uid is the image's, not the host's: to read a host's /etc/pve-reconcile (root:pve-reconcile 0640)
# run with --group-add "$(getent group pve-reconcile | cut -d: -f3)"; the host's secrets are root-only
# (docs/reference.md, "With the container image": the token in an --env-file, a key copy for uid 10001).
FROM python:3.11-slim
COPY --from=build /opt/pve-reconcile /opt/pve-reconcile
RUN groupadd --system --gid 10001 pve-reconcile \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin pve-reconcile \
 && mkdir -p /var/lib/pve-reconcile && chown 10001:10001 /var/lib/pve-reconcile \
 && install -d -m 0750 -o 10001 -g 10001 /run/pve-reconcile
# Numeric, so a runtime that checks "non-root" without reading /etc/passwd (Kubernetes) can tell.
USER 10001:10001
ENV PATH=/opt/pve-reconcile/bin:$PATH \
    PVE_PLANNER_LISTEN=0.0.0.0:50051 \
    PVE_PLANNER_LOG_FORMAT=json \
    PVE_EXECUTOR_LOG_FORMAT=json \
    PVE_EXECUTOR_STATE_DIR=/var/lib/pve-reconcile \
    PVE_HEALTH_ADDRESS=127.0.0.1:50051
EXPOSE 50051
VOLUME ["/var/lib/pve-reconcile"]
# The gRPC health service decides (SERVING); for the executor set
# PVE_HEALTH_ADDRESS=unix:/run/pve-reconcile/executor.sock (its API's socket, the image's user owns it).
# Exec form (no shell): pve-healthcheck reads PVE_HEALTH_ADDRESS itself when given no address.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
  CMD ["/opt/pve-reconcile/bin/pve-healthcheck"]
CMD ["pve-planner", "serve"]
