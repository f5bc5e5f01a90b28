"""The executor's client of the planner service: deadline, bounded retry, one error type."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import grpc

from common.grpcserver import OWN_SUBCHANNELS, ClientTls, channel_credentials
from executor.errors import ExecutorError, PermanentError, TemporaryError
from executor.loop.desired import Declared
from executor.loop.planner_failures import diagnose
from executor.pve.node import LXC, QEMU, GuestState
from planner.v1 import planner_pb2 as pb
from planner.v1 import planner_pb2_grpc as pb_grpc

RUN_STATES = {"running": pb.RUN_STATE_RUNNING, "stopped": pb.RUN_STATE_STOPPED, "paused": pb.RUN_STATE_PAUSED}
GUEST_TYPES = {QEMU: pb.GUEST_TYPE_QEMU, LXC: pb.GUEST_TYPE_LXC}
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED})
REFUSED = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                     grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNIMPLEMENTED})
MAX_MESSAGE = 256 * 1024 * 1024


class PlannerError(ExecutorError, RuntimeError):
    """The planner produced no plan."""


class PlannerUnavailableError(PlannerError, TemporaryError):
    """The planner could not be reached (after the retries): the next tick tries again; ``cause`` says why."""

    def __init__(self, message: str, cause: str | None = None, hint: str = "") -> None:
        super().__init__(message)
        self.cause, self.hint = cause, hint


class PlannerRefusedError(PlannerError, PermanentError):
    """The planner answered and refused the request (INVALID_ARGUMENT...): a bug here, not retried."""


def desired_to_proto(guests: Iterable[Declared]) -> list[pb.DesiredGuest]:
    """Declared guests as planner.v1 messages."""
    out = []
    for guest in guests:
        message = pb.DesiredGuest(vmid=guest.vmid)
        if guest.state is not None:
            message.run_state = RUN_STATES[guest.state]
        if guest.config is not None:
            message.spec.SetInParent()
            message.spec.config.update(guest.config)
        if guest.description is not None:
            message.description = guest.description
        out.append(message)
    return out


def actual_to_proto(guest: GuestState, config: tuple[dict[str, str], str] | None) -> pb.ActualGuest:
    """An observed guest (with its config and digest when read) as a planner.v1 message."""
    message = pb.ActualGuest(vmid=guest.vmid, type=GUEST_TYPES[guest.type],
                             run_state=RUN_STATES.get(guest.status, pb.RUN_STATE_STOPPED), lock=guest.lock)
    if config is not None:
        message.config_known = True
        message.config.update(config[0])
        message.digest = config[1]
    return message


class PlannerClient:
    """Calls planner.v1.PlannerService/Plan over one long-lived channel."""

    def __init__(self, target: str, *, deadline: float = 30.0, attempts: int = 3, tls: ClientTls | None = None) -> None:
        # round_robin: a DNS name or an ipv4:A,B list of several stateless planners spreads the calls,
        # and a planner that goes away is skipped by the channel.
        options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE),
                   ("grpc.lb_policy_name", "round_robin"), OWN_SUBCHANNELS]
        self._channel = (grpc.secure_channel(target, channel_credentials(tls), options=options) if tls
                         else grpc.insecure_channel(target, options=options))
        self._stub = pb_grpc.PlannerServiceStub(self._channel)
        self._target, self._tls = target, tls
        self._deadline, self._attempts = deadline, attempts

    def plan(self, desired: Sequence[pb.DesiredGuest], actual: Sequence[pb.ActualGuest]) -> pb.PlanResponse:
        """Plan, retrying transient failures with a short backoff; PlannerUnavailableError otherwise."""
        request = pb.PlanRequest(desired=desired, actual=actual)
        for attempt in range(1, self._attempts + 1):
            try:
                response: pb.PlanResponse = self._stub.Plan(request, timeout=self._deadline)
                return response
            except grpc.RpcError as exc:
                code = exc.code()
                if code in REFUSED:
                    raise PlannerRefusedError(f"planner refused the request: {code.name}: {exc.details()}") from exc
                if code not in RETRYABLE or attempt == self._attempts:
                    raise self._unavailable(code, str(exc.details())) from exc
                time.sleep(0.2 * attempt)
        raise AssertionError("unreachable")

    def _unavailable(self, code: grpc.StatusCode, details: str) -> PlannerUnavailableError:
        """The error of a call that failed for good: its cause and the flag to fix, when they are known."""
        failure = diagnose(code, details, self._target, self._tls)
        if failure is None:
            return PlannerUnavailableError(f"planner: {code.name}: {details}")
        return PlannerUnavailableError(failure.message, failure.code, failure.hint)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()
