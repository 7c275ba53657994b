"""`Llama`: build a model from a checkpoint, then complete, infill and chat.

The public methods keep the names, arguments and result dictionaries of the reference
release; new abilities are keyword arguments it did not have.
"""

import time
from typing import Callable, List, Optional, Tuple, TypedDict, Union

import torch

from llama import checkpoint, distributed, kernels, kv_cache, memory_plan, quantized_checkpoint
from llama.engine import Engine
from llama.model import ModelArgs, Transformer
from llama.prompts import (
    UNSAFE_ERROR,
    Dialog,
    Message,
    infilling_prompt_tokens,
    instruct_prompt_tokens,
    is_unsafe,
    require_infilling,
    split_fill_me,
    turn_prompt_tokens,
    validate_dialog,
)
from llama.sampling import SamplingParams, sample_top_p  # noqa: F401  (the reference's name)
from llama.speculation import Speculation
from llama.tokenizer import Tokenizer


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class InfillingPrediction(TypedDict, total=False):
    generation: str
    full_text: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class Llama:
    """A loaded model and its tokenizer."""

    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: str,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        *,
        seed: int = 1,
        dtype: Union[None, str, torch.dtype] = None,
        compile: bool = False,
        quantize: Optional[str] = None,
        quantize_group_size: Optional[int] = None,
        draft_ckpt_dir: Optional[str] = None,
        kv_cache_dtype: Optional[str] = None,
        kv_cache_tokens: Optional[int] = None,
    ) -> "Llama":
        """Load a checkpoint on this process's model-parallel rank and return a ready `Llama`.

        Starts the process group and fairscale model parallelism if needed (under torchrun, or
        as a one-rank group in a plain process), seeds every rank identically, silences stdout
        of ranks > 0, memory-maps this rank's slices into the model and allocates the KV cache
        for `max_batch_size` sequences of `max_seq_len` tokens.

        Args:
            ckpt_dir: folder with `params.json` and `consolidated.NN.pth` shards saved for any
                model-parallel size (resharded on load: each rank reads only its slices), or a
                Hugging Face folder with `config.json` and safetensors weights.
            tokenizer_path: the SentencePiece `tokenizer.model`.
            max_seq_len: longest prompt + generation, in tokens.
            max_batch_size: sequences generated at once (more prompts run in successive batches).
            model_parallel_size: number of ranks the model is split over (default: world size).
            seed: random seed, the same on every rank (sampling must agree across ranks).
            dtype: "bfloat16", "float16" or "float32"; default bf16 where supported, else
                fp16 on GPU, fp32 on CPU.
            compile: run the decode step (one new token per row) through `torch.compile`:
                the first generation sets it up and pays the compilation, later steps run
                fused code.
            quantize: "int8" or "int4": quantize the linear layers' weights while loading, one
                tensor at a time (`llama.quantization`). A quantized checkpoint (written by
                `python -m llama.quantize`) loads quantized without it.
            quantize_group_size: int4 group size (32, 64 or 128; default 64).
            draft_ckpt_dir: a smaller checkpoint with the same tokenizer (e.g. Code Llama 7B for
                34B or 70B), loaded beside the main one with its own KV cache, split over the
                same ranks, for requests that ask for `Speculation("draft")`. It is loaded
                unquantized, in `dtype`.
            kv_cache_dtype: how the KV cache stores keys and values: None (default) in `dtype`,
                or "int8": int8 codes with one fp32 scale per token and kv head (`llama.kv_cache`),
                about half the memory of a 16-bit cache, read in place by the decode-attention
                kernel. The draft model's cache is stored the same way.
            kv_cache_tokens: page the KV cache: a pool of this many positions (in blocks of
                `kv_cache.KV_BLOCK_LEN`) shared by the `max_batch_size` rows, instead of
                `max_batch_size x max_seq_len` positions. A request is admitted when the pool
                can hold its prompt + max_tokens besides the running requests' (it waits
                otherwise; one that could never fit is refused); memory then follows what the
                live requests may use, e.g. `max_seq_len=100000` with 8 rows and a pool of
                131072 positions. The draft model's cache stays dense.

        Raises:
            FileNotFoundError: missing directory, params.json, shards or tokenizer.
            ValueError: invalid sizes, params, shards, vocabulary, parallel split, or a KV cache
                that does not fit in memory; the message names the file or number to fix.
        """
        started = time.perf_counter()
        kv_cache.check_kv_cache_dtype(kv_cache_dtype)
        if kv_cache_tokens is not None and (not isinstance(kv_cache_tokens, int) or kv_cache_tokens < 1):
            raise ValueError(f"kv_cache_tokens must be a positive integer, got {kv_cache_tokens!r}")
        if not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")

        params = checkpoint.read_params(ckpt_dir)
        mp_rank, mp_size = distributed.init_model_parallel(model_parallel_size)
        distributed.silence_non_zero_ranks()
        torch.manual_seed(seed)
        device = distributed.compute_device()
        model_dtype = distributed.resolve_dtype(dtype, device)

        tokenizer = Tokenizer(tokenizer_path)
        model = _load_model(
            ckpt_dir, params, tokenizer, max_seq_len, max_batch_size, (mp_rank, mp_size), model_dtype,
            device, quantize, quantize_group_size, kv_cache_dtype, kv_cache_tokens,
        )  # fmt: skip
        n_params = quantized_checkpoint.parameter_count(model) * mp_size
        size = f"{n_params / 1e9:.2f}B" if n_params >= 1e9 else f"{n_params / 1e6:.2f}M"
        draft = None
        if draft_ckpt_dir is not None:
            draft_params = checkpoint.read_params(draft_ckpt_dir)
            draft = _load_model(
                draft_ckpt_dir, draft_params, tokenizer, max_seq_len, max_batch_size, (mp_rank, mp_size),
                model_dtype, device, None, None, kv_cache_dtype,
            )  # fmt: skip
            draft_size = quantized_checkpoint.parameter_count(draft) * mp_size / 1e6
            size += f" (draft {draft_size:.2f}M from {draft_ckpt_dir})"
        print(
            f"Loaded {size}-parameter model from {ckpt_dir} (MP={mp_size}, "
            f"{str(model_dtype).removeprefix('torch.')}, {device}"
            f"{', int8 KV cache' if kv_cache_dtype == 'int8' else ''}"
            f"{_paged_summary(model)}) in "
            f"{time.perf_counter() - started:.2f} s"
        )
        return Llama(model, tokenizer, compile=compile, draft_model=draft)

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        compile: bool = False,
        draft_model: Optional[Transformer] = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.compile = compile
        self._compiled_model: Optional[Callable[..., torch.Tensor]] = None
        self.engine = Engine(model, tokenizer, draft_model=draft_model)

    def set_up_compile(self) -> None:
        """With `compile`, make the engine's decode pass run compiled (a no-op without it, or when
        done). The first generation calls it on every model-parallel rank (not build: loading
        stays a load); callers that drive the engine directly (a server) call it themselves."""
        if self.compile and self._compiled_model is None:
            self._compiled_model = _compiled(self.model.forward_decode)
            self.engine.decode_fn = self._compiled_model

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        stop_token: Optional[int] = None,
        *,
        speculation: Optional[Speculation] = None,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Generate a continuation of each prompt.

        Greedy at `temperature == 0`, else nucleus sampling of softmax(logits / temperature)
        with `top_p`. Each sequence stops at `stop_token` (default EOS; like the reference,
        only that token stops it), after `max_gen_len` tokens, or at `max_seq_len`; the stop
        token is not returned. With `speculation` (`Speculation("lookup")`, or `"draft"` when
        built with a draft model), proposed tokens are checked in the decode pass: the same
        tokens when greedy, the same distribution when sampling. The prompts run through the
        engine's loop: more prompts than `max_batch_size` join the running batch as rows finish.
        A prompt's greedy result does not depend on the other prompts. Thread-safe: concurrent
        calls share the running batch.

        Returns:
            (tokens, logprobs): per prompt, the generated ids (preceded by the prompt with
            `echo`) and, with `logprobs`, each returned token's log-probability under the
            model (0.0 for the first prompt token), else None.

        Raises:
            ValueError: if a prompt is empty, holds an id outside the vocabulary or leaves no
                room to generate within max_seq_len, or max_gen_len is negative.
        """
        self._check_prompts(prompt_tokens)
        if max_gen_len < 0:
            raise ValueError(f"max_gen_len must be >= 0, got {max_gen_len}")
        # Checked on every rank before the followers start waiting for rank 0, so a refusal
        # is raised everywhere at once.
        sampling = SamplingParams(temperature=max(float(temperature), 0.0), top_p=top_p)
        sampling.validate(self.model.params.vocab_size)
        if speculation is not None:
            speculation.validate()
        self.set_up_compile()
        if not distributed.is_first_model_parallel_rank():
            return self.engine.follow(until_result=True)  # rank 0 decides and sends the results
        max_positions = self.engine.max_request_positions  # max_seq_len, or a smaller paged pool
        requests = []
        try:
            for prompt in prompt_tokens:
                requests.append(
                    self.engine.submit(
                        prompt,
                        max_tokens=min(max_gen_len, max_positions - len(prompt)),
                        sampling=sampling,
                        default_stop=self.tokenizer.eos_id if stop_token is None else stop_token,
                        logprobs=0 if logprobs else None,
                        prompt_logprobs=logprobs and echo,
                        speculation=speculation,
                    )
                )
            out_tokens: List[List[int]] = []
            out_logprobs: List[List[float]] = []
            for prompt, request in zip(prompt_tokens, requests):
                completion = request.result()
                toks, lps = list(completion.token_ids), list(completion.logprobs)
                if echo:
                    toks = list(prompt) + toks
                    lps = (completion.prompt_logprobs or []) + lps
                out_tokens.append(toks)
                out_logprobs.append(lps)
        except BaseException as error:
            for request in requests:
                request.cancel()
            distributed.broadcast_from_first_rank(("error", f"{type(error).__name__}: {error}"))
            raise
        result = (out_tokens, (out_logprobs if logprobs else None))
        distributed.broadcast_from_first_rank(("result", result))
        return result

    def _check_prompts(self, prompt_tokens: List[List[int]], names: Optional[List[str]] = None) -> None:
        """Raise ValueError naming the first prompt that is empty, holds an id outside the
        vocabulary, or leaves no room to generate."""
        for index, prompt in enumerate(prompt_tokens):
            self.engine.check_prompt(list(prompt), names[index] if names is not None else f"prompt {index}")

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def _max_gen_len(self, max_gen_len: Optional[int]) -> int:
        if max_gen_len is None:
            return self.model.params.max_seq_len - 1
        if max_gen_len < 1:
            raise ValueError(f"max_gen_len must be >= 1, got {max_gen_len}")
        return max_gen_len

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        *,
        speculation: Optional[Speculation] = None,
    ) -> List[CompletionPrediction]:
        """Continue each prompt.

        Returns:
            per prompt `{"generation": str}`, plus `"tokens"` (pieces) and `"logprobs"` when
            `logprobs`; with `echo` the prompt is part of the generation.

        Raises:
            ValueError: see `generate`.
        """
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        tokens, token_logprobs = self.generate(
            prompt_tokens,
            self._max_gen_len(max_gen_len),
            temperature,
            top_p,
            logprobs,
            echo,
            speculation=speculation,
        )
        return [
            self._prediction(
                {"generation": self.tokenizer.decode(t)},
                t,
                None if token_logprobs is None else token_logprobs[i],
            )
            for i, t in enumerate(tokens)
        ]

    def text_infilling(
        self,
        prefixes: Optional[List[str]] = None,
        suffixes: Optional[List[str]] = None,
        temperature: float = 0.0,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        suffix_first: bool = False,
        *,
        prompts: Optional[List[str]] = None,
        speculation: Optional[Speculation] = None,
    ) -> List[InfillingPrediction]:
        """Fill in the code between each prefix and suffix.

        Either `prefixes` and `suffixes`, or `prompts` that each contain one `<FILL_ME>` marker
        (as in the Hugging Face port). Generation stops at `▁<EOT>`.

        Returns:
            per pair `{"generation": middle, "full_text": prefix + middle + suffix}`, plus
            `"tokens"` and `"logprobs"` when `logprobs`.

        Raises:
            ValueError: if the model cannot infill, the inputs are inconsistent, a prompt has
                no or several `<FILL_ME>` markers, or a prompt is too long.
        """
        if prompts is not None:
            if prefixes is not None or suffixes is not None:
                raise ValueError("pass either prompts with <FILL_ME> or prefixes and suffixes, not both")
            prefixes, suffixes = split_fill_me(prompts)
        if prefixes is None or suffixes is None:
            raise ValueError("text_infilling needs prefixes and suffixes (or prompts with <FILL_ME>)")
        if len(prefixes) != len(suffixes):
            raise ValueError(
                f"got {len(prefixes)} prefixes but {len(suffixes)} suffixes: pass one of each per infill"
            )
        require_infilling(self.tokenizer)
        prompt_tokens = [
            infilling_prompt_tokens(self.tokenizer, prefix, suffix, suffix_first=suffix_first)
            for prefix, suffix in zip(prefixes, suffixes)
        ]
        tokens, token_logprobs = self.generate(
            prompt_tokens,
            self._max_gen_len(max_gen_len),
            temperature,
            top_p,
            logprobs,
            echo=False,
            stop_token=self.tokenizer.eot_id,
            speculation=speculation,
        )
        results = []
        for i, (t, prefix, suffix) in enumerate(zip(tokens, prefixes, suffixes)):
            middle = self.tokenizer.decode_infilling(t)
            prediction = {"generation": middle, "full_text": prefix + middle + suffix}
            results.append(
                self._prediction(prediction, t, None if token_logprobs is None else token_logprobs[i])
            )
        return results

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        *,
        speculation: Optional[Speculation] = None,
    ) -> List[ChatPrediction]:
        """Answer the last user message of each dialog.

        Uses the turn-based format when the tokenizer has `<step>` (70B Instruct), the
        Instruct `[INST]` format otherwise. A dialog containing special tags is answered with
        the reference's error content; the other dialogs are still answered.

        Returns:
            per dialog `{"generation": {"role": "assistant", "content": str}}` (plus
            `"destination": "user"` in the turn format), and `"tokens"`/`"logprobs"` when
            `logprobs`.

        Raises:
            ValueError: naming the dialog and message whose role is out of order, or a prompt
                that is too long.
        """
        turns = self.tokenizer.step_id is not None
        for index, dialog in enumerate(dialogs):
            validate_dialog(dialog, index)
        unsafe = [is_unsafe(dialog) for dialog in dialogs]
        format_dialog = turn_prompt_tokens if turns else instruct_prompt_tokens
        safe_rows = [i for i, flagged in enumerate(unsafe) if not flagged]
        prompt_tokens = [format_dialog(self.tokenizer, dialogs[i]) for i in safe_rows]
        self._check_prompts(prompt_tokens, [f"dialog {i}" for i in safe_rows])
        tokens, token_logprobs = self.generate(
            prompt_tokens,
            self._max_gen_len(max_gen_len),
            temperature,
            top_p,
            logprobs,
            stop_token=self.tokenizer.step_id if turns else None,
            speculation=speculation,
        )
        by_dialog = dict(zip(safe_rows, range(len(safe_rows))))
        results = []
        for i in range(len(dialogs)):
            if i in by_dialog:
                t = tokens[by_dialog[i]]
                content = self.tokenizer.decode(t)
                lp = token_logprobs[by_dialog[i]] if logprobs else None
            else:
                t, content, lp = [], UNSAFE_ERROR, ([] if logprobs else None)
            message: Message = {"role": "assistant", "content": content}
            if turns:
                message["destination"] = "user"
            results.append(self._prediction({"generation": message}, t, lp))
        return results

    def _prediction(self, prediction: dict, tokens: List[int], token_logprobs: Optional[List[float]]) -> dict:
        """Add `tokens` (pieces) and `logprobs` to a result when log-probabilities were asked for."""
        if token_logprobs is not None:
            prediction["tokens"] = [self.tokenizer.token_piece(x) for x in tokens]
            prediction["logprobs"] = token_logprobs
        return prediction


def _compiled(decode: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The model's decode pass under torch.compile (prompts are prefilled eagerly).

    Fused code keeps the eager rounding of every intermediate bf16/fp16 value
    (`emulate_precision_casts`): without it, fused elementwise chains skip those roundings and
    greedy decoding drifts away from the eager (and reference) tokens at near ties.
    """
    kernels.kernel_available()  # settle the kernel choice before tracing
    return torch.compile(decode, fullgraph=True, dynamic=True, options={"emulate_precision_casts": True})


def _paged_summary(model: Transformer) -> str:
    """The load summary's words on a paged cache (none for a dense one)."""
    blocks = model.kv_blocks
    return "" if blocks is None else f", paged KV cache of {blocks.blocks * blocks.block_len} positions"


def _load_model(
    ckpt_dir: str,
    params: dict,
    tokenizer: Tokenizer,
    max_seq_len: int,
    max_batch_size: int,
    mp: Tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
    quantize: Optional[str],
    quantize_group_size: Optional[int],
    kv_cache_dtype: Optional[str] = None,
    kv_cache_tokens: Optional[int] = None,
) -> Transformer:
    """This rank's slice of a checkpoint, with its KV cache allocated, after the memory check."""
    mp_rank, mp_size = mp
    args = _model_args(params, tokenizer, max_seq_len, max_batch_size, mp_size, ckpt_dir)
    group_size = quantize_group_size or memory_plan.DEFAULT_GROUP_SIZE
    memory_plan.check_fits(
        args, mp_size, dtype, device, quantize, group_size, kv_cache_dtype, kv_cache_tokens
    )
    if (
        quantize is None
        and quantize_group_size is None
        and not quantized_checkpoint.is_quantized_dir(ckpt_dir)
    ):
        state_dict = checkpoint.load_rank_state_dict(ckpt_dir, params, mp_rank, mp_size)
        model = checkpoint.empty_model(args)
        checkpoint.check_state_dict(model, state_dict, ckpt_dir)
        checkpoint.assign_weights(model, state_dict, dtype, device)
        del state_dict
    else:
        source = quantized_checkpoint.open_source(ckpt_dir, quantize, quantize_group_size)
        model = quantized_checkpoint.load_model(
            source, params, args, mp_rank, mp_size, dtype, device, torch_ops=kernels.enabled()
        )
    model.allocate_cache(dtype, device, kv_cache_dtype, kv_cache_tokens)
    model.eval()
    return model


def _model_args(
    params: dict, tokenizer: Tokenizer, max_seq_len: int, max_batch_size: int, mp_size: int, ckpt_dir: str
) -> ModelArgs:
    """ModelArgs from params.json, checked against the tokenizer and the model-parallel size."""
    args = ModelArgs(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **params)
    if args.vocab_size is None or args.vocab_size <= 0:
        args.vocab_size = tokenizer.n_words
    elif args.vocab_size != tokenizer.n_words:
        raise ValueError(
            f"the tokenizer {tokenizer.model_path} has {tokenizer.n_words} pieces but "
            f"{ckpt_dir}/params.json says vocab_size={args.vocab_size}: use the tokenizer.model "
            "that came with this checkpoint"
        )
    if args.dim % args.n_heads != 0:
        raise ValueError(f"params.json: dim={args.dim} is not divisible by n_heads={args.n_heads}")
    if args.n_heads % args.kv_heads != 0:
        raise ValueError(
            f"params.json: n_heads={args.n_heads} is not a multiple of n_kv_heads={args.kv_heads}"
        )
    for name, count in (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads)):
        if count % mp_size != 0:
            raise ValueError(
                f"{name}={count} is not divisible by the model-parallel size {mp_size}: "
                f"use a number of processes that divides {count}"
            )
    return args


def kv_cache_bytes(
    args: ModelArgs, mp_size: int, dtype: torch.dtype, kv_cache_dtype: Optional[str] = None
) -> int:
    """Bytes of one rank's KV cache (keys and values of every layer, int8 codes and scales with
    `kv_cache_dtype="int8"`)."""
    settings = memory_plan.Settings(
        args,
        mp_size=mp_size,
        dtype=dtype,
        max_seq_len=args.max_seq_len,
        max_batch_size=args.max_batch_size,
        kv_cache_dtype=kv_cache_dtype,
    )
    return memory_plan.kv_cache_bytes(settings)
