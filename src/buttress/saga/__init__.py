"""Steps and sagas: named steps with compensations, idempotency and a durable run log."""

from buttress.events import RecoverySkipped
from buttress.exceptions import IdempotencyConflict, Permanent, SagaClosed

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
    "Context",
    "IdempotencyConflict",
    "Permanent",
    "RecoveryReport",
    "RecoverySkipped",
    "RecoveryWorker",
    "Saga",
    "SagaClosed",
    "SagaResult",
    "Step",
    "StepResult",
    "StoredError",
]
