"""Engine: requests in, tokens out. One step = schedule -> run the model -> sample -> bookkeeping."""

import itertools
import logging
import os
from dataclasses import dataclass, field

import torch

from moetier.config import EngineConfig, resolve
from moetier.engine.block_manager import BlockManager
from moetier.engine.kv_cache import KVCache
from moetier.engine.runner import Runner
from moetier.engine.sampler import Sampler
from moetier.engine.scheduler import ScheduledSeq, Scheduler
from moetier.engine.sequence import Sequence
from moetier.errors import MoetierError
from moetier.loader.load import load_model, read_source
from moetier.loader.resolve import resolve_model_dir
from moetier.offload.budget import CONTEXT_BYTES
from moetier.offload.executor import OffloadedExecutor
from moetier.offload.predict import make_predictor
from moetier.sampling_params import SamplingParams
from moetier.tokenizer import Tokenizer, read_stop_token_ids

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None  # None while running; "stop" | "length" | "abort"
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    logprobs: list[dict] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def cap_allocator(device: torch.device, gpu_budget: int) -> None:
    """Caps torch's caching allocator at the budget less what NVML counts beyond it (context and
    kernels): past the cap it frees its cached blocks before it grows, so the process stays in budget.
    Under a cap, fixed-size segments fragment into an out-of-memory (measured on OLMoE-1B-7B at
    4 GiB: a 56 MiB request failed with 223 MiB cached in pieces), so segments are made growable
    unless the user configured the allocator."""
    if not (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")):
        # torch 2.13 moved the setter to the accelerator namespace; the device machine runs 2.11.
        set_allocator = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
        (set_allocator or torch.cuda.memory._set_allocator_settings)("expandable_segments:True")
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(max(gpu_budget - CONTEXT_BYTES, 0) / total, 1.0), index)


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.source = read_source(resolve_model_dir(config.model))
        self.resolved = resolve(config, self.source.model_dir, self.source.spec)
        r = self.resolved
        if r.memory_plan is not None and r.device.type == "cuda":
            cap_allocator(r.device, r.memory_plan.gpu_budget)
        self.model, self.executor = load_model(
            self.source, r.dtype, r.device, config.load_format, config.seed, r.expert_slots, config.eviction,
            r.host_experts,
        )
        if isinstance(self.executor, OffloadedExecutor):
            self.executor.predictor = make_predictor(config.predictor, self.model)
        self.tokenizer = Tokenizer.from_dir(self.source.model_dir)
        self.stop_token_ids = read_stop_token_ids(self.source.model_dir, self.source.config, self.tokenizer)
        # One block beyond the sequences' share: the scratch block that CUDA-graph padding rows write to.
        kv_cache = KVCache(self.model.kv_cache_token_shapes(), r.num_kv_blocks + 1, config.block_size, r.dtype, r.device)
        self.runner = Runner(
            self.model, kv_cache, r.device,
            max_batch=config.max_num_seqs,
            max_blocks_per_seq=-(-r.max_model_len // config.block_size),
            scratch_block=r.num_kv_blocks,
            cuda_graphs=config.cuda_graphs,
        )
        self.blocks = BlockManager(r.num_kv_blocks, config.block_size)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.sampler = Sampler(self.stop_token_ids)
        self._request_ids = itertools.count()
        self._sequences: dict[str, Sequence] = {}

    def offload_stats(self) -> dict[str, float] | None:
        """The expert cache's numeric counters (hit rate, hits, misses, bytes copied, copy stall,
        slot occupancy, ...) when experts are offloaded, None when they are resident: the server's
        `moetier_expert_cache_*` gauges."""
        stats = self.executor.stats()
        if stats.get("executor") != "offloaded":
            return None
        return {k: float(v) for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    # --- requests -------------------------------------------------------------------------

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise MoetierError(f"{self.source.model_dir} has no tokenizer.json: give prompts as token ids")
        return self.tokenizer

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        ids = self.require_tokenizer().encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise MoetierError("the prompt is empty")
        vocab = self.source.spec.vocab_size
        if not all(isinstance(i, int) and 0 <= i < vocab for i in ids):
            raise MoetierError(f"prompt token ids must be integers in [0, {vocab})")
        if len(ids) >= self.resolved.max_model_len:
            raise MoetierError(
                f"the prompt has {len(ids)} tokens but max_model_len is {self.resolved.max_model_len} "
                "(prompt plus at least one new token must fit)"
            )
        return ids

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        request_id = request_id or f"req-{next(self._request_ids)}"
        if request_id in self._sequences:
            raise MoetierError(f"request id {request_id} is already in use")
        seq = Sequence(request_id, self.encode_prompt(prompt), params)
        self._sequences[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> None:
        seq = self._sequences.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, "abort")
            self.sampler.release(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- the loop -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        logits_BV = self.runner.run(scheduled)
        sampling = [item.seq for item in scheduled if item.samples]
        for item in scheduled:
            item.seq.num_computed += item.num_new_tokens
        tokens = self.sampler.sample(logits_BV, sampling)
        return [self._append(seq, token, logits_V) for seq, token, logits_V in zip(sampling, tokens, logits_BV)]

    def _append(self, seq: Sequence, token: int, logits_V: torch.Tensor) -> RequestOutput:
        seq.output_ids.append(token)
        new_logprobs = self._logprobs(seq, token, logits_V)
        reason = self._update_text_and_finish(seq, token)
        if reason:
            self.scheduler.finish(seq, reason)
            self.sampler.release(seq.request_id)
            self._sequences.pop(seq.request_id, None)
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_ids,
            token_ids=list(seq.output_ids),
            text=seq.text,
            finish_reason=seq.finish_reason,
            new_token_ids=[token],
            new_text=self._emit(seq),
            logprobs=new_logprobs,
        )

    def _logprobs(self, seq: Sequence, token: int, logits_V: torch.Tensor) -> list[dict] | None:
        if seq.params.logprobs is None:
            return None
        logprobs_V = torch.log_softmax(logits_V, dim=-1)
        top = torch.topk(logprobs_V, seq.params.logprobs) if seq.params.logprobs else None
        entry = {
            "token_id": token,
            "logprob": float(logprobs_V[token]),
            "top": [] if top is None else list(zip(top.indices.tolist(), top.values.tolist())),
        }
        seq.logprobs.append(entry)
        return [entry]

    def _update_text_and_finish(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        can_stop = len(seq.output_ids) >= params.min_tokens
        seq.text += self._detokenize(seq)
        if can_stop and params.stop:
            hits = [i for i in (seq.text.find(s, seq.stop_search_from) for s in params.stop) if i >= 0]
            if hits:
                seq.text = seq.text[: min(hits)]
                return "stop"
            seq.stop_search_from = max(0, len(seq.text) - max(len(s) for s in params.stop) + 1)
        eos = not params.ignore_eos and token in self.stop_token_ids
        reason = None
        if can_stop and (eos or token in params.stop_token_ids):
            reason = "stop"
        elif len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.resolved.max_model_len:
            reason = "length"
        if reason:
            seq.text += self._detokenize(seq, final=True)  # a trailing incomplete character, if any
        return reason

    def _detokenize(self, seq: Sequence, final: bool = False) -> str:
        if self.tokenizer is None:
            return ""
        new_text, seq.detok_prefix, seq.detok_read = self.tokenizer.decode_increment(
            seq.output_ids, seq.detok_prefix, seq.detok_read, final
        )
        return new_text

    def _emit(self, seq: Sequence) -> str:
        """New text safe to stream: holds back a possible stop-string prefix and partial UTF-8."""
        end = len(seq.text)
        if not seq.is_finished:
            end -= max((len(s) for s in seq.params.stop), default=1) - 1
            while end > seq.emitted_chars and seq.text[end - 1] == "\ufffd":
                end -= 1
        if end <= seq.emitted_chars:
            return ""
        new_text = seq.text[seq.emitted_chars : end]
        seq.emitted_chars = end
        return new_text

    # --- scoring ------------------------------------------------------------------------

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Teacher-forced logits [len(token_ids), vocab] (fp32), computed in prefill chunks."""
        if self.scheduler.has_unfinished():
            raise MoetierError("score() needs an idle engine")
        seq = Sequence("score", self.encode_prompt(token_ids), SamplingParams())
        chunks = []
        try:
            while seq.num_computed < seq.num_tokens:
                n = min(self.config.max_num_batched_tokens, seq.num_tokens - seq.num_computed)
                self.blocks.allocate(seq, n)
                chunks.append(self.runner.run([ScheduledSeq(seq, n)], all_logits=True))
                seq.num_computed += n
        finally:
            self.blocks.free(seq)
        return torch.cat(chunks)
