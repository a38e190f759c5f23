"""buttress: resilience primitives for Python services, sync and async.

Retry, circuit breaker, bulkhead, rate limiter, timeout, debounce, throttle,
fallback, hedge and pipeline; health and state views; typed events.
"""

from . import backoff as backoff
from . import chaos as chaos
from . import events as events
from ._deadline import remaining as remaining
from .adaptive import AdaptiveBulkhead as AdaptiveBulkhead
from .bulkhead import Bulkhead as Bulkhead
from .cache import Cache as Cache
from .cache import cache as cache
from .circuit_breaker import CircuitBreaker as CircuitBreaker
from .clock import Clock as Clock
from .clock import SystemClock as SystemClock
from .debounce import Debounce as Debounce
from .debounce import Throttle as Throttle
from .debounce import debounce as debounce
from .debounce import throttle as throttle
from .exceptions import BackendError as BackendError
from .exceptions import BackendUnavailable as BackendUnavailable
from .exceptions import BulkheadFull as BulkheadFull
from .exceptions import ButtressError as ButtressError
from .exceptions import ChildFailed as ChildFailed
from .exceptions import CircuitOpenError as CircuitOpenError
from .exceptions import ConfigError as ConfigError
from .exceptions import ConfigTypeError as ConfigTypeError
from .exceptions import ConfigValueError as ConfigValueError
from .exceptions import DuplicateNameError as DuplicateNameError
from .exceptions import LoopBlockingWarning as LoopBlockingWarning
from .exceptions import RateLimited as RateLimited
from .exceptions import RejectedError as RejectedError
from .exceptions import RetryExhausted as RetryExhausted
from .exceptions import RunCancelled as RunCancelled
from .exceptions import SagaClosed as SagaClosed
from .exceptions import SagaError as SagaError
from .exceptions import TimeoutExceeded as TimeoutExceeded
from .exceptions import TryAgain as TryAgain
from .exceptions import VersionMismatch as VersionMismatch
from .exceptions import WaitTimedOut as WaitTimedOut
from .fallback import Fallback as Fallback
from .fallback import fallback as fallback
from .hedge import Hedge as Hedge
from .hedge import hedge as hedge
from .pipeline import Pipeline as Pipeline
from .pipeline import pipeline as pipeline
from .rate_limiter import RateLimiter as RateLimiter
from .registry import Registry as Registry
from .registry import default_registry as default_registry
from .registry import health as health
from .registry import liveness as liveness
from .registry import readiness as readiness
from .registry import state as state
from .retry import Retry as Retry
from .retry import RetryBudget as RetryBudget
from .retry import RetryState as RetryState
from .retry import retry as retry
from .saga import IdempotencyConflict as IdempotencyConflict
from .saga import Permanent as Permanent
from .saga import Saga as Saga
from .saga import SagaResult as SagaResult
from .saga import Step as Step
from .saga import StepResult as StepResult
from .timeout import Timeout as Timeout
from .timeout import timeout as timeout

__all__ = [
    "AdaptiveBulkhead",
    "BackendError",
    "BackendUnavailable",
    "Bulkhead",
    "BulkheadFull",
    "ButtressError",
    "Cache",
    "ChildFailed",
    "CircuitBreaker",
    "CircuitOpenError",
    "Clock",
    "ConfigError",
    "ConfigTypeError",
    "ConfigValueError",
    "Debounce",
    "DuplicateNameError",
    "Fallback",
    "Hedge",
    "IdempotencyConflict",
    "LoopBlockingWarning",
    "Permanent",
    "Pipeline",
    "RateLimited",
    "RateLimiter",
    "Registry",
    "RejectedError",
    "Retry",
    "RetryBudget",
    "RetryExhausted",
    "RetryState",
    "RunCancelled",
    "Saga",
    "SagaClosed",
    "SagaError",
    "SagaResult",
    "Step",
    "StepResult",
    "SystemClock",
    "Throttle",
    "Timeout",
    "TimeoutExceeded",
    "TryAgain",
    "VersionMismatch",
    "WaitTimedOut",
    "backoff",
    "cache",
    "chaos",
    "debounce",
    "default_registry",
    "events",
    "fallback",
    "health",
    "hedge",
    "liveness",
    "pipeline",
    "readiness",
    "remaining",
    "retry",
    "state",
    "throttle",
    "timeout",
]


def __getattr__(name: str) -> str:
    if name == "__version__":
        from importlib.metadata import version

        return version("buttress")
    raise AttributeError(f"module 'buttress' has no attribute {name!r}")
