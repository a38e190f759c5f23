"""Steps and sagas: named steps with compensations, idempotency and a durable run log."""

from buttress.exceptions import IdempotencyConflict, Permanent

from ._model import AttemptRecord, Context, SagaResult, Step, StepResult, StoredError
from ._saga import Saga

__all__ = [
    "AttemptRecord",
    "Context",
    "IdempotencyConflict",
    "Permanent",
    "Saga",
    "SagaResult",
    "Step",
    "StepResult",
    "StoredError",
]
