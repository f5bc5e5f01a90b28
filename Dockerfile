# One image for both services: `pve-planner serve` (default) or `pve-executor run`.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY planner ./planner
COPY executor ./executor
COPY journal ./journal
RUN python -m venv /opt/pve-reconcile && /opt/pve-reconcile/bin/pip install --no-cache-dir .

FROM python:3.11-slim
COPY --from=build /opt/pve-reconcile /opt/pve-reconcile
RUN useradd --system --uid 10001 --no-create-home pve-reconcile
USER pve-reconcile
ENV PATH=/opt/pve-reconcile/bin:$PATH
EXPOSE 50051
ENTRYPOINT ["pve-planner"]
CMD ["serve", "--listen", "0.0.0.0:50051"]
