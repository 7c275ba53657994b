"""The engine loop: requests join and leave a running batch, one step at a time.

- `scheduler`: which requests run next step, from the waiting queue, the running sequences and
  the free cache slots (plain data in, a plan out; no torch).
- `executor`: runs a planned step on the model (all that model-parallel ranks > 0 need).
- `stream`: a request's events, wakers, cancel on close, and `fold(events) -> Completion`.
- `request`: a submitted request and the checks of its prompt and options.
- `core`: `Engine`, which ties them together and samples each row with its own settings.

Under model parallelism, rank 0 decides everything (admission, cancellation, sampled tokens)
and broadcasts each step's plan; the other ranks `follow`. Nothing relies on the ranks' random
generators agreeing.
"""

from llama.engine.core import IDLE_HEARTBEAT_SECONDS, Engine
from llama.engine.executor import FollowerError
from llama.engine.request import Request, check_prompt
from llama.engine.stream import Completion, Event, Usage, fold

__all__ = [
    "Completion",
    "Engine",
    "Event",
    "FollowerError",
    "IDLE_HEARTBEAT_SECONDS",
    "Request",
    "Usage",
    "check_prompt",
    "fold",
]
