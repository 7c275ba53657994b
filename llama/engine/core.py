"""`Engine`: requests join and leave a running batch, one step at a time.

Each `step` asks the scheduler for a plan (admitting waiting requests, retiring cancelled ones),
broadcasts it to the other model-parallel ranks, has the executor run it, then samples a token
for every row whose logits are due, with each request's own settings, and publishes it as an
`Event` (exact text delta, ids, log-probabilities, and at the end the finish reason and usage).

Decode rows and prefill chunks run in separate passes so a row's numbers never depend on what
else shares its step. A row whose sampling or bookkeeping raises is failed alone; only an
error of the model pass itself fails every live request.
"""

import itertools
import threading
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from llama import distributed, limits
from llama.engine.executor import Executor
from llama.engine.request import Request, check_options, check_prompt
from llama.engine.scheduler import BlockBudget, Plan, Scheduler, Step, common_prefix
from llama.engine.stream import Event
from llama.model import Transformer
from llama.sampling import RowSampler, SamplingParams, sample_rows, sampling_probabilities, token_logprobs
from llama.speculation import Speculation, accept_greedy, verify_sampled
from llama.tokenizer import Tokenizer

# While idle under model parallelism, rank 0 tells the other ranks it is alive this often, so
# their wait for the next plan never reaches the process group's timeout.
IDLE_HEARTBEAT_SECONDS = 10.0
_DEFAULT = object()


class Engine:
    """The one generation loop of the project: see the module docstring.

    Args:
        model: a loaded `Transformer` (its KV cache rows are the slots).
        tokenizer: the model's tokenizer (EOS is the default stop token).
        prefill_chunk: most prompt tokens prefilled in one step (bounds the step time).
        prefix_reuse: reuse the keys and values of a cached prefix (a free slot whose tokens
            start the new prompt) instead of recomputing them.
        decode_fn: replaces `model.forward_decode` (e.g. a compiled version).
        draft_model: a smaller model with the same vocabulary and cache rows, for requests that
            speculate with `Speculation("draft")`.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        prefill_chunk: int = 512,
        prefix_reuse: bool = True,
        decode_fn: Optional[Callable[..., torch.Tensor]] = None,
        draft_model: Optional[Transformer] = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        blocks = getattr(model, "kv_blocks", None)  # a paged cache's block table
        budget = None if blocks is None else BlockBudget(blocks.blocks, blocks.block_len)
        self.scheduler = Scheduler(model.params.max_batch_size, prefill_chunk, prefix_reuse, budget)
        self.executor = Executor(model, decode_fn)
        self.draft: Optional[Executor] = None
        if draft_model is not None:
            if draft_model.params.vocab_size != model.params.vocab_size:
                raise ValueError(
                    f"the draft model's vocabulary ({draft_model.params.vocab_size}) differs from the "
                    f"main model's ({model.params.vocab_size}): a draft must share the tokenizer"
                )
            if (draft_model.params.max_batch_size, draft_model.params.max_seq_len) != (
                model.params.max_batch_size,
                model.params.max_seq_len,
            ):
                raise ValueError("the draft model's cache must have the main model's rows and length")
            self.draft = self.executor.draft = Executor(draft_model)
        # Per slot, the ids whose keys and values the draft model's cache holds.
        self._draft_tokens: List[List[int]] = [[] for _ in range(model.params.max_batch_size)]
        self.max_seq_len = model.params.max_seq_len
        self.vocab_size = model.params.vocab_size
        self._lock = threading.Lock()  # guards the scheduler's queues and the thread flags
        self._step_lock = threading.Lock()  # one step at a time
        self._work = threading.Condition(self._lock)
        self._ids = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self.speculative_proposed = 0  # tokens proposed by speculation, and of those accepted
        self.speculative_accepted = 0

    # ------------------------------------------------------------------ settings

    @property
    def prefill_chunk(self) -> int:
        return self.scheduler.prefill_chunk

    @prefill_chunk.setter
    def prefill_chunk(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {value}")
        self.scheduler.prefill_chunk = value

    @property
    def prefix_reuse(self) -> bool:
        return self.scheduler.prefix_reuse

    @prefix_reuse.setter
    def prefix_reuse(self, value: bool) -> None:
        self.scheduler.prefix_reuse = value

    @property
    def decode_fn(self) -> Optional[Callable[..., torch.Tensor]]:
        return self.executor.decode_fn

    @decode_fn.setter
    def decode_fn(self, value: Optional[Callable[..., torch.Tensor]]) -> None:
        self.executor.decode_fn = value

    @property
    def device(self) -> torch.device:
        return self.executor.device

    @property
    def max_request_positions(self) -> int:
        """Most positions one request may take (prompt + max_tokens): max_seq_len, or the positions
        of a paged cache's pool when it holds fewer."""
        budget = self.scheduler.budget
        return self.max_seq_len if budget is None else min(self.max_seq_len, budget.blocks * budget.block_len)

    @property
    def thread_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ submitting

    def check_prompt(self, prompt: Sequence[int], name: str = "the prompt") -> None:
        """Refuse a prompt this engine cannot run (see `llama.engine.check_prompt`).

        Raises:
            ValueError: naming `name` and what to change.
        """
        check_prompt(list(prompt), self.vocab_size, self.max_seq_len, name)

    def submit(
        self,
        prompt_tokens: Sequence[int],
        *,
        max_tokens: int,
        sampling: Optional[SamplingParams] = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        default_stop: Any = _DEFAULT,
        logprobs: Optional[int] = None,
        include_stop_str: bool = False,
        prompt_logprobs: bool = False,
        speculation: Optional[Speculation] = None,
    ) -> Request:
        """Queue a request; it joins the running batch at the next step. Thread-safe.

        Args:
            prompt_tokens: the prompt's ids (BOS included when wanted).
            max_tokens: most tokens to generate; prompt + max_tokens must fit max_seq_len.
            sampling: temperature, top_p, top_k, min_p, penalties, logit bias and seed
                (default greedy), within the bounds of `llama.limits`.
            stop: up to 4 non-empty strings; generation stops before the first one (matched
                across token boundaries); the text excludes it unless `include_stop_str`.
            stop_token_ids: ids that stop generation, besides `default_stop`.
            default_stop: the format's own stop id (EOS by default; `tokenizer.eot_id` for
                infilling, `tokenizer.step_id` for turn-based chat; None for none).
            logprobs: None for none, 0 for each token's log-probability, 1..5 to add that
                many most likely alternatives.
            prompt_logprobs: also compute the prompt tokens' log-probabilities (no prefix reuse).
            speculation: propose tokens by prompt lookup and check them in the decode pass
                (`llama.speculation.Speculation`); greedy requests get exactly the tokens they
                would get without it, sampled ones the same distribution. Requests with
                penalties or logit bias decode one token at a time.

        Returns:
            the `Request`.

        Raises:
            ValueError: naming the parameter and its allowed range, or the token counts of a
                prompt that does not fit; nothing else running is affected.
        """
        prompt = list(prompt_tokens)
        self.check_prompt(prompt)
        stop = [stop] if isinstance(stop, str) else list(stop)
        stop_ids = list(stop_token_ids)
        check_options(max_tokens, len(prompt), self.max_seq_len, stop, stop_ids, self.vocab_size, logprobs)
        self._check_fits_the_pool(len(prompt), max_tokens)
        sampling = SamplingParams() if sampling is None else sampling
        sampler = RowSampler(sampling, prompt, self.vocab_size, self.device)  # validates `sampling`
        if speculation is not None:
            speculation.validate()
            if speculation.method == "draft" and self.draft is None:
                raise ValueError(
                    'speculative method "draft" needs a draft model loaded beside this one: '
                    "Llama.build(..., draft_ckpt_dir=...), or --draft for the server and the command"
                )
        default = self.tokenizer.eos_id if default_stop is _DEFAULT else default_stop
        if default is not None:
            stop_ids.append(default)
        request = Request(
            f"req-{next(self._ids)}",
            prompt,
            max_tokens,
            sampling,
            sampler,
            self.tokenizer,
            stop,
            stop_ids,
            logprobs,
            prompt_logprobs,
            include_stop_str,
            advance=self._drive,
            engine_thread_running=lambda: self.thread_running,
            wake=self._wake,
            speculation=speculation,
        )
        with self._lock:
            self.scheduler.add(request)
            self._work.notify_all()
        return request

    def _check_fits_the_pool(self, prompt_len: int, max_tokens: int) -> None:
        """Refuse a request a paged cache could never hold: it would wait forever."""
        limit, needed = self.max_request_positions, prompt_len + max_tokens
        if needed <= limit:
            return
        raise ValueError(
            f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) needs {needed} cache "
            f"positions, more than the paged KV cache holds ({limit}, kv_cache_tokens): lower "
            "max_tokens or shorten the prompt"
        )

    def forget_prefixes(self) -> None:
        """Drop what the free slots remember, so no later request reuses their cached prefixes."""
        with self._step_lock, self._lock:
            self.scheduler.forget_prefixes()

    def stats(self) -> Dict[str, int]:
        """Counts for monitoring: running and waiting requests, free slots, the batch size, and with a
        paged cache its blocks and the blocks neither reserved by a running request nor caching a prefix."""
        with self._lock:
            running, waiting = len(self.scheduler.running), len(self.scheduler.waiting)
            free = self.scheduler.free_slots()
            budget, paged = self.scheduler.budget, {}
            if budget is not None:
                paged = {
                    "kv_cache_blocks": budget.blocks,
                    "kv_cache_blocks_free": self.scheduler.free_blocks(),
                }
        return {
            "running": running,
            "waiting": waiting,
            "free_slots": free,
            "max_batch_size": len(self.scheduler.slots),
            "speculative_proposed": self.speculative_proposed,
            "speculative_accepted": self.speculative_accepted,
            **paged,
        }

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        """Run steps in a daemon thread whenever there is work (what a server does)."""
        with self._lock:
            if self.thread_running:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="codellama-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        """Stop the engine thread: live requests end "cancelled"; other ranks are released."""
        try:
            with self._lock:
                self._stopping = True
                for request in list(self.scheduler.waiting) + self.scheduler.running:
                    request.cancelled = True
                self._work.notify_all()
            if self._thread is not None:
                self._thread.join()
                self._thread = None
            try:
                self._drive()  # retire what is left
            except Exception:  # already handed to the failed requests
                traceback.print_exc()
        finally:
            distributed.broadcast_from_first_rank(("shutdown",))

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self.scheduler.has_work() and not self._stopping:
                    self._work.wait(timeout=IDLE_HEARTBEAT_SECONDS)
                if self._stopping:
                    return
                idle = not self.scheduler.has_work()
            if idle:
                distributed.broadcast_from_first_rank(("idle",))
                continue
            try:
                self._drive()
            except Exception:  # already handed to the failed requests; keep serving the next ones
                traceback.print_exc()

    def _wake(self) -> None:
        with self._lock:
            self._work.notify_all()

    def _drive(self) -> None:
        """Run one step unless another thread is running one (then wait for it)."""
        with self._step_lock:
            try:
                self.step()
            except Exception as error:  # the model failed: fail every live request with it
                with self._lock:
                    failed = self.scheduler.drain()
                for request in failed:
                    request.stream.fail(error)
                raise

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit, compute and sample once. Returns whether any request was live."""
        with self._lock:
            drafting = self._propose()
        if drafting:
            self._draft(drafting)
        with self._lock:
            step = self.scheduler.schedule()
        for request in step.retired:
            request.stream.publish(Event("", finish_reason="cancelled", usage=request.usage()))
        if step.plan is None:
            return False
        distributed.broadcast_from_first_rank(("step", step.plan))
        decode_logits, prefill_logits = self.executor.run(step.plan)
        self._advance(step, decode_logits, prefill_logits)
        return True

    def _propose(self) -> List[Tuple[Request, int]]:
        """Give each running lookup row its proposals for this step: at most its adaptive length,
        what fits its context and max_tokens, and `limits.SPECULATION_ROWS` decode rows in all
        (the kernels' fixed reduction order covers up to 8 rows). Returns the draft-model rows
        and how many tokens each may propose."""
        decoding = [r for r in self.scheduler.running if r.pending is not None and not r.cancelled]
        room = limits.SPECULATION_ROWS - len(decoding)
        drafting = []
        for request in decoding:
            request.proposals = []
            if request.lengths is None or room <= 0:
                continue
            position = len(request.prompt_tokens) + len(request.generated) - 1  # of the fed token
            wanted = min(
                request.lengths.next_length(),
                room,
                self.max_seq_len - 1 - position,
                request.max_tokens - len(request.generated) - 1,
            )
            if wanted > 0 and request.drafted:
                drafting.append((request, wanted))
                room -= wanted
            elif wanted > 0:
                request.proposals = request.lookup.propose(wanted)
                room -= len(request.proposals)
        return drafting

    def _draft(self, drafting: List[Tuple[Request, int]]) -> None:
        """Have the draft model propose tokens, one pass per token. Its cache rows are first
        brought up to the ids the main model has cached: a few missing ids (the last accepted
        proposal, which the draft never fed) go in front of the row's token in the first pass;
        a longer gap (a prompt) is filled by one packed pass."""
        catch_up = []
        feeding: Dict[int, List[int]] = {}
        for request, _ in drafting:
            target = self.scheduler.slots[request.slot].tokens
            held = self._draft_tokens[request.slot]
            n = common_prefix(held, target)
            missing = list(target[n:])
            if len(missing) >= limits.SPECULATION_ROWS:
                catch_up.append((request.slot, n, missing))
                missing, n = [], len(target)
            del held[n:]
            held.extend(target[len(held) : n])
            feeding[id(request)] = missing + [request.pending]
        if catch_up:
            self._run_draft(Plan(decode=[], prefill=catch_up))
        drawn: Dict[int, List[torch.Tensor]] = {id(r): [] for r, _ in drafting}
        for i in range(max(wanted for _, wanted in drafting)):
            active = [r for r, wanted in drafting if wanted > i]
            plan = Plan(decode=[], prefill=[])
            last_rows = []  # the logits row of each active request's newest token
            for request in active:
                start = len(self._draft_tokens[request.slot])
                for j, token in enumerate(feeding[id(request)]):
                    plan.decode.append((request.slot, start + j, token))
                last_rows.append(len(plan.decode) - 1)
            logits, _ = self._run_draft(plan)
            for row, request in zip(last_rows, active):
                self._draft_tokens[request.slot].extend(feeding[id(request)])
                if request.sampling.is_greedy:
                    token = int(logits[row].argmax())
                else:
                    q = sampling_probabilities(logits[row : row + 1], request.sampling)[0]
                    token = int(torch.multinomial(q, 1, generator=request.sampler.generator))
                    drawn[id(request)].append(q)
                request.proposals.append(token)
                feeding[id(request)] = [token]
        for request, _ in drafting:
            qs = drawn[id(request)]
            request.draft_probs = torch.stack(qs) if qs else None

    def _run_draft(self, plan: Plan) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        distributed.broadcast_from_first_rank(("draft", plan))
        return self.draft.run(plan)

    def follow(self, until_result: bool = False) -> Any:
        """On model-parallel ranks > 0: run rank 0's plans until it shuts down (or, with
        `until_result`, until it broadcasts a batch result, which is returned).

        Raises:
            FollowerError: with `until_result`, when rank 0 failed the batch call.
        """
        return self.executor.follow(until_result)

    # ------------------------------------------------------------------ results

    def _advance(
        self, step: Step, decode_logits: Optional[torch.Tensor], prefill_logits: Optional[torch.Tensor]
    ) -> None:
        """Record what the passes computed, sample the rows that are due, publish events."""
        plan = step.plan
        due: List[Request] = []
        logits = []
        verifying: List[Tuple[Request, List[int], torch.Tensor]] = []
        if len(plan.decode) == len(step.decoding):  # no proposals: one logits row per request
            due, logits = list(step.decoding), ([decode_logits] if step.decoding else [])
        else:
            row = 0
            for request in step.decoding:
                proposed = list(request.proposals)  # `decoded` below clears them
                rows = decode_logits[row : row + 1 + len(proposed)]
                row += 1 + len(proposed)
                if proposed:
                    verifying.append((request, proposed, rows))
                else:
                    due.append(request)
                    logits.append(rows)
        offset = 0
        for request, (_, start, chunk) in zip(step.prefilling, plan.prefill):
            with self._lock:
                self.scheduler.prefilled(request, chunk)
            if plan.all_logits:
                chunk_logits = prefill_logits[offset : offset + len(chunk)]
                offset += len(chunk)
                if request.prompt_logprobs:
                    targets = request.prompt_tokens[start + 1 : start + len(chunk) + 1]
                    lp = torch.log_softmax(chunk_logits[: len(targets)], dim=-1)
                    ids = torch.tensor(targets, device=lp.device)[:, None]
                    request.prompt_lps += lp.gather(-1, ids)[:, 0].tolist()
                last = chunk_logits[-1:]
            else:
                last = prefill_logits[offset : offset + 1]
                offset += 1
            if not request.prefilled:
                continue
            if request.max_tokens == 0:
                self._finish(request, "length", "")
                continue
            due.append(request)
            logits.append(last)
        with self._lock:
            for request in step.decoding:
                self.scheduler.decoded(request)
        for request, proposed, rows in verifying:
            try:
                self._verify(request, proposed, rows)
            except Exception as error:  # this request's check failed: it alone ends
                self._fail(request, error)
        if not due:
            return
        all_logits = torch.cat(logits) if len(logits) > 1 else logits[0]
        tokens, errors = self._sample(all_logits, due)
        want = [r.logprobs for r in due if r.logprobs is not None]
        chosen_lp = top = None
        if want:
            chosen_lp, top = token_logprobs(
                all_logits, torch.tensor(tokens, device=all_logits.device), max(want)
            )
            chosen_lp = chosen_lp.tolist()
            if top is not None:
                top = (top[0].tolist(), top[1].tolist())
        for i, (request, token) in enumerate(zip(due, tokens)):
            if i in errors:
                self._fail(request, errors[i])
                continue
            lp = None if chosen_lp is None else chosen_lp[i]
            alternatives = None
            if top is not None and request.logprobs:
                k = request.logprobs
                alternatives = dict(zip(top[0][i][:k], top[1][i][:k]))
            try:
                self._accept(request, token, lp, alternatives)
            except Exception as error:  # this request's bookkeeping failed: it alone ends
                self._fail(request, error)

    def _verify(self, request: Request, proposed: List[int], logits: torch.Tensor) -> None:
        """Keep the proposals the main model agrees with (greedy: its argmax; sampled: the
        speculative sampling rule) and publish them with the main model's own next token."""
        if request.sampling.is_greedy:
            targets = logits.argmax(-1).tolist()
            emitted = targets[: accept_greedy(proposed, targets) + 1]
        else:
            probabilities = sampling_probabilities(logits, request.sampling)
            draft = request.draft_probs if request.drafted else None
            emitted = verify_sampled(proposed, probabilities, draft, request.sampler.generator)
        accepted = len(emitted) - 1
        request.lengths.record(len(proposed), accepted)
        request.proposed += len(proposed)
        request.accepted += accepted
        self.speculative_proposed += len(proposed)
        self.speculative_accepted += accepted
        chosen = top = None
        if request.logprobs is not None:
            ids = torch.tensor(emitted, device=logits.device)
            chosen, top = token_logprobs(logits[: len(emitted)], ids, request.logprobs)
            chosen = chosen.tolist()
            top = None if top is None else (top[0].tolist(), top[1].tolist())
        for j, token in enumerate(emitted):
            alternatives = None if top is None else dict(zip(top[0][j], top[1][j]))
            self._accept(request, token, None if chosen is None else chosen[j], alternatives)
            if request.slot is None:  # finished (a stop, max_tokens or the context)
                return
            if j < accepted:  # an accepted proposal: its keys and values are cached already
                with self._lock:
                    self.scheduler.decoded(request)

    def _sample(self, logits: torch.Tensor, due: List[Request]) -> Tuple[List[int], Dict[int, Exception]]:
        """Each due row's token; a row whose sampling raises gets token 0 and its error."""
        try:
            return sample_rows(logits, [r.sampler for r in due]).tolist(), {}
        except Exception:  # find the rows that fail, and sample the others on their own
            tokens, errors = [], {}
            for i, request in enumerate(due):
                try:
                    tokens.append(int(sample_rows(logits[i : i + 1], [request.sampler])[0]))
                except Exception as error:
                    tokens.append(0)
                    errors[i] = error
            return tokens, errors

    def _fail(self, request: Request, error: Exception) -> None:
        with self._lock:
            self.scheduler.release(request)
        request.stream.fail(error)

    def _accept(
        self, request: Request, token: int, logprob: Optional[float], alternatives: Optional[Dict[int, float]]
    ) -> None:
        """Add one sampled token to a request, publish it, and finish the request when due."""
        request.sampled += 1
        request.sampler.observe(token)
        if token in request.stop_ids:
            self._finish(request, "stop", "")
            return
        request.generated.append(token)
        if request.lookup is not None:
            request.lookup.append(token)
        event = Event(request.detokenizer.add(token), [token])
        if request.logprobs is not None:
            event.logprobs.append(logprob)
            if request.logprobs:
                event.top_logprobs.append(alternatives)
        event.text, stopped = request.stops.feed(event.text)
        finish = None
        if stopped:
            finish = "stop"
        elif len(request.generated) >= request.max_tokens:
            finish = "length"
        elif len(request.prompt_tokens) + len(request.generated) >= self.max_seq_len:
            finish = "length"  # no room to feed this token
        if finish is None:
            request.pending = token
            request.stream.publish(event)
            return
        self._finish(request, finish, event.text, event, flush=not stopped)

    def _finish(
        self, request: Request, reason: str, text: str, event: Optional[Event] = None, flush: bool = True
    ) -> None:
        if flush:
            tail, stopped = request.stops.feed(request.detokenizer.flush())
            text += tail + ("" if stopped else request.stops.flush())
        event = event or Event("")
        event.text, event.finish_reason, event.usage = text, reason, request.usage()
        with self._lock:
            self.scheduler.release(request)
        request.stream.publish(event)
