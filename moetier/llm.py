"""LLM: the Python API.

    llm = LLM("path/to/checkpoint", dtype="bfloat16")
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
"""

from collections.abc import Callable
from dataclasses import fields

import torch

from moetier.config import EngineConfig
from moetier.engine.engine import Engine, RequestOutput
from moetier.errors import MoetierError
from moetier.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, **engine_options):
        known = {f.name for f in fields(EngineConfig)}
        unknown = set(engine_options) - known
        if unknown:
            raise MoetierError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
        self.engine = Engine(EngineConfig(model=model, **engine_options))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        params: SamplingParams | list[SamplingParams] | None = None,
        on_output: Callable[[int, RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Generates for every prompt (text or token ids), batched; on_output streams each step's deltas
        as (prompt index, output). Returns one final output per prompt, in prompt order."""
        single = isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], int))
        prompt_list = [prompts] if single else list(prompts)
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompt_list)
        if len(params_list) != len(prompt_list):
            raise MoetierError("give one SamplingParams, or one per prompt")
        index_of = {}
        for i, (prompt, p) in enumerate(zip(prompt_list, params_list)):
            index_of[self.engine.add_request(prompt, p)] = i
        results: list[RequestOutput | None] = [None] * len(prompt_list)
        while self.engine.has_unfinished():
            for output in self.engine.step():
                i = index_of[output.request_id]
                if on_output is not None:
                    on_output(i, output)
                if output.finished:
                    results[i] = output
        return results

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        params: SamplingParams | None = None,
        on_output: Callable[[int, RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Applies the checkpoint's chat template to one conversation or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.engine.require_tokenizer().encode_chat(c) for c in conversations]
        return self.generate(prompts, params, on_output)

    def stats(self) -> dict:
        """The expert executor's counters (offloading: hits, misses, bytes copied, copy wait)."""
        return self.engine.executor.stats()

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Teacher-forced logits [len(token_ids), vocab] in fp32."""
        return self.engine.score(token_ids)
