"""What the handlers share: the loaded model (once loaded), the admission bound and the metrics."""

import time
from typing import Callable, Dict, Optional

from llama.engine import Engine
from llama.server.errors import APIError
from llama.server.jobs import Job
from llama.server.metrics import ServerMetrics
from llama.server.runner import (
    RETRY_AFTER_SECONDS,
    Capacity,
    EngineUnavailable,
    Generation,
    start_generation,
)
from llama.speculation import Speculation
from llama.tokenizer import Tokenizer


class ServerState:
    """The server's model and counters. The model is set by `set_ready` once loaded.

    Args:
        model_name: the name `/v1/models` reports and requests may name.
        max_queue: generations that may wait for a slot before requests get 503.
        default_speculation: the speculation of requests that do not say (the --lookup flag),
            or None for none.
    """

    def __init__(self, model_name: str, max_queue: int, default_speculation: Optional[Speculation] = None):
        self.model_name = model_name
        self.max_queue = max_queue
        self.default_speculation = default_speculation
        self.created = int(time.time())
        self.engine_: Optional[Engine] = None
        self.tokenizer_: Optional[Tokenizer] = None
        self.capacity: Optional[Capacity] = None
        self.model_parallel = False
        self.load_error: Optional[str] = None
        self.engine_error: Optional[str] = None
        self.metrics = ServerMetrics(self.engine_stats)

    def set_ready(self, engine: Engine, tokenizer: Tokenizer, model_parallel: bool = False) -> None:
        """Serve with `engine` (already started) from now on. With `model_parallel`, a failed
        engine step is fatal: the ranks no longer run the same steps."""
        self.model_parallel = model_parallel
        self.capacity = Capacity(engine.stats()["max_batch_size"], self.max_queue)
        self.tokenizer_ = tokenizer
        self.engine_ = engine

    @property
    def ready(self) -> bool:
        return self.engine_ is not None and self.engine_error is None

    def engine_stats(self) -> Optional[Dict[str, int]]:
        return None if self.engine_ is None else self.engine_.stats()

    def engine_alive(self) -> bool:
        """False once the engine's thread has died (e.g. a model-parallel rank went away)."""
        if self.engine_ is not None and not self.engine_.thread_running and self.engine_error is None:
            self.engine_error = "the step loop ended (a model-parallel rank may have exited)"
        return self.engine_error is None

    def engine_failed(self, error: BaseException) -> APIError:
        """The answer to a request the engine failed while generating: 503 (and the server stops)
        under model parallelism, where a failed step means a rank is gone or out of step; 500
        otherwise (the engine keeps serving the next requests)."""
        reason = str(error) or type(error).__name__
        if self.model_parallel:
            self.engine_error = f"a model-parallel step failed: {reason}"
            return EngineUnavailable(self.engine_error)
        return APIError(500, f"generation failed: {reason}", code="engine_error")

    def engine(self) -> Engine:
        """The running engine.

        Raises:
            APIError: 503 while the model loads, or after it failed to load or stopped.
        """
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
        if self.engine_ is None:
            raise APIError(
                503,
                "the model is still loading; retry shortly",
                code="model_loading",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        if not self.engine_alive():
            raise EngineUnavailable(self.engine_error)
        return self.engine_

    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer (raises like `engine`)."""
        self.engine()
        return self.tokenizer_

    async def generate(self, endpoint: str, choices: int, make_job: Callable[[], Job]) -> Generation:
        """Start a generation of `choices` choices whose job `make_job` builds (see
        `runner.start_generation`; errors as there, and 503 as `engine`)."""
        engine = self.engine()
        return await start_generation(
            engine, self.capacity, self.metrics, endpoint, self.engine_failed, choices, make_job
        )
