"""The gRPC edge of the planner: validation errors to status codes, plan to protobuf."""

from __future__ import annotations

import time

import grpc
import structlog

from planner.metrics import PlannerMetrics
from planner.model import Action, Plan, SetConfig, Start, Stop
from planner.plan import plan
from planner.v1 import planner_pb2 as pb
from planner.validate import InvalidRequestError

log = structlog.get_logger("planner.service")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PlannerService"].full_name


def action_to_proto(action: Action) -> pb.Action:
    """One domain action as a ``planner.v1.Action``."""
    out = pb.Action(vmid=action.vmid, type=int(action.guest_type))  # type: ignore[arg-type]
    match action:
        case SetConfig():
            out.set_config.digest = action.digest
            out.set_config.set.update(action.set)
            out.set_config.delete.extend(action.delete)
        case Start():
            out.start.SetInParent()
        case Stop():
            out.stop.SetInParent()
    return out


def plan_to_proto(result: Plan) -> pb.PlanResponse:
    """A domain plan as a ``planner.v1.PlanResponse``."""
    return pb.PlanResponse(
        actions=[action_to_proto(a) for a in result.actions],
        skipped=[
            pb.Skip(vmid=s.vmid, reason=int(s.reason), detail=s.detail, keys=s.keys)  # type: ignore[arg-type]
            for s in result.skipped
        ],
    )


class PlannerServicer:
    """``planner.v1.PlannerService``: validates, plans, logs one line per call, counts in ``metrics``."""

    def __init__(self, metrics: PlannerMetrics | None = None) -> None:
        self.metrics = metrics or PlannerMetrics()

    def Plan(self, request: pb.PlanRequest, context: grpc.ServicerContext) -> pb.PlanResponse:  # noqa: N802
        """Plan one snapshot; INVALID_ARGUMENT names the bad field."""
        started = time.perf_counter()
        try:
            result = plan(request.desired, request.actual)
        except InvalidRequestError as exc:
            self.metrics.plans.labels("invalid").inc()
            log.info("plan_rejected", field=exc.field, reason=exc.reason)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception:
            # A bug must not reach the client as UNKNOWN with a traceback: INTERNAL, logged here.
            self.metrics.plans.labels("error").inc()
            log.exception("plan_failed")
            context.abort(grpc.StatusCode.INTERNAL, "planner failed on this request; see the planner log")
        response = plan_to_proto(result)
        elapsed = time.perf_counter() - started
        self.metrics.plans.labels("ok").inc()
        self.metrics.duration.observe(elapsed)
        self.metrics.guests.observe(len(request.desired))
        self.metrics.actions.observe(len(result.actions))
        log.info(
            "plan", desired=len(request.desired), actual=len(request.actual),
            actions=len(result.actions), skipped=len(result.skipped),
            duration_ms=round(elapsed * 1000, 2),
        )
        return response
