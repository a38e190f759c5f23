"""Steps and sagas: named steps with compensations, idempotency and a durable run log."""

from buttress.events import RecoverySkipped
from buttress.exceptions import (
    ChildFailed,
    IdempotencyConflict,
    Permanent,
    RunCancelled,
    SagaClosed,
    SagaError,
    VersionMismatch,
    WaitTimedOut,
)

from ._model import (
    AttemptRecord,
    Context,
    RecoveryReport,
    SagaResult,
    Step,
    StepResult,
    StoredError,
)
from ._saga import Saga
from ._worker import RecoveryWorker

__all__ = [
    "AttemptRecord",
    "ChildFailed",
    "Context",
    "IdempotencyConflict",
    "Permanent",
    "RecoveryReport",
    "RecoverySkipped",
    "RecoveryWorker",
    "RunCancelled",
    "Saga",
    "SagaClosed",
    "SagaError",
    "SagaResult",
    "Step",
    "StepResult",
    "StoredError",
    "VersionMismatch",
    "WaitTimedOut",
]
