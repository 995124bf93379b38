"""The OpenAI endpoints' logic: request -> prompts and SamplingParams -> AsyncEngine -> response.

Everything the client got wrong is raised as an APIError (400/404/429) before anything is
queued; what runs afterwards only streams. A client that goes away aborts its sequences at once:
streams through the cancelled response generator, non-streaming requests through a watcher on
the ASGI receive channel.
"""

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import jinja2
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from moetier.engine.engine import RequestOutput
from moetier.errors import MoetierError
from moetier.sampling_params import SamplingParams
from moetier.serve import protocol as p
from moetier.serve.async_engine import AsyncEngine, EngineFailed, RequestHandle, ServerBusy

log = logging.getLogger(__name__)

MIN_LOGPROB = -9999.0  # -inf is not JSON
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class _Choice:
    """What one sequence produced so far."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, output: RequestOutput) -> None:
        self.text += output.new_text
        self.token_ids += output.new_token_ids
        self.logprobs += output.logprobs or []
        self.finish_reason = output.finish_reason


@dataclass
class _Prepared:
    """A validated request, ready to submit: one (prompt ids, params) per sequence."""

    request_id: str
    prompt_lens: list[int]  # one per distinct prompt
    sequences: list[tuple[list[int], SamplingParams]]


def _ignored_fields(request: p._SamplingRequest) -> None:
    extra = sorted(request.model_extra or ())
    if extra:
        log.info("ignoring unknown request fields: %s", ", ".join(extra))


class OpenAIServing:
    def __init__(self, async_engine: AsyncEngine, served_model_name: str):
        self.async_engine = async_engine
        self.engine = async_engine.engine
        self.model_name = served_model_name
        self.max_model_len = self.engine.resolved.max_model_len

    # --- models ------------------------------------------------------------------------------

    def models(self) -> p.ModelList:
        card = p.ModelCard(
            id=self.model_name, created=p.now(), root=str(self.engine.source.model_dir),
            max_model_len=self.max_model_len, vocab_size=self.engine.source.spec.vocab_size,
        )
        return p.ModelList(data=[card])

    # --- validation -----------------------------------------------------------------------------

    def _check(self, request: p._SamplingRequest) -> None:
        if request.model is not None and request.model != self.model_name:
            raise p.APIError(404, f"The model `{request.model}` does not exist (this server serves "
                             f"`{self.model_name}`).", "model", "model_not_found")
        problem = request.unsupported()
        if problem is not None:
            raise p.APIError(400, problem[1], problem[0], "unsupported_parameter")
        vocab = self.engine.source.spec.vocab_size
        if any(i >= vocab for i in request.stop_token_ids or ()):
            raise p.APIError(400, f"stop_token_ids must be in [0, {vocab})", "stop_token_ids")
        _ignored_fields(request)

    def _encode(self, prompt: str | list[int], param: str) -> list[int]:
        try:
            return self.engine.encode_prompt(prompt)
        except MoetierError as e:
            code = "context_length_exceeded" if "max_model_len" in str(e) else None
            raise p.APIError(400, str(e), param, code) from None

    def _max_tokens(self, requested: int | None, prompt_len: int, param: str) -> int:
        room = self.max_model_len - prompt_len
        if requested is None:
            return room
        if requested > room:
            raise p.APIError(
                400, f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the completion). "
                "Please reduce the prompt or the completion length.", param, "context_length_exceeded")
        return requested

    def _prepare(self, request: p._SamplingRequest, prompts: list[list[int]], requested: int | None,
                 logprobs: int | None, prefix: str) -> _Prepared:
        param = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) else "max_tokens"
        sequences = []
        for ids in prompts:
            max_tokens = self._max_tokens(requested, len(ids), param)
            for choice in range(request.n):
                try:
                    params = request.sampling_params(max_tokens, logprobs, choice)
                except MoetierError as e:
                    raise p.APIError(400, str(e)) from None
                sequences.append((ids, params))
        return _Prepared(p.new_id(prefix), [len(ids) for ids in prompts], sequences)

    def _submit(self, prepared: _Prepared) -> RequestHandle:
        try:
            return self.async_engine.submit(prepared.request_id, prepared.sequences)
        except ServerBusy as e:
            raise p.APIError(429, str(e), None, "queue_full", "server_busy_error") from None
        except MoetierError as e:
            raise p.APIError(400, str(e), "n") from None
        except EngineFailed as e:
            raise p.APIError(503, str(e), None, "engine_unavailable", "server_error") from None

    def _chat_prompt(self, request: p.ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            tokenizer = self.engine.require_tokenizer()
            text = tokenizer.apply_chat_template(messages)
            ids = tokenizer.encode(text, add_special_tokens=False)
        except MoetierError as e:
            raise p.APIError(400, str(e), "messages") from None
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise p.APIError(400, f"the chat template failed on these messages: {e}", "messages") from None
        return self._encode(ids, "messages")

    # --- endpoints ------------------------------------------------------------------------------

    async def chat(self, request: p.ChatCompletionRequest, raw: Request) -> Response:
        self._check(request)
        prompt = self._chat_prompt(request)
        prepared = self._prepare(request, [prompt], request.requested_max_tokens, request.num_logprobs, "chatcmpl")
        handle = self._submit(prepared)
        if request.stream:
            return _EngineStream(self._chat_stream(request, prepared, handle), handle)
        choices = await self._collect(handle, raw)
        body = p.ChatCompletion(
            id=prepared.request_id, created=p.now(), model=self.model_name,
            choices=[
                p.ChatChoice(
                    index=i, message=p.AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                    logprobs=self._chat_logprobs(c.logprobs) if request.logprobs else None,
                    token_ids=c.token_ids if request.return_token_ids else None,
                )
                for i, c in enumerate(choices)
            ],
            usage=self._usage(prepared, choices),
        )
        return self._json(body)

    async def completions(self, request: p.CompletionRequest, raw: Request) -> Response:
        self._check(request)
        prompts = [self._encode(prompt, "prompt") for prompt in request.prompts()]
        prepared = self._prepare(request, prompts, request.max_tokens, request.logprobs, "cmpl")
        handle = self._submit(prepared)
        if request.stream:
            return _EngineStream(self._completion_stream(request, prepared, handle), handle)
        choices = await self._collect(handle, raw)
        body = p.Completion(
            id=prepared.request_id, created=p.now(), model=self.model_name,
            choices=[
                p.CompletionChoice(
                    index=i, text=c.text, finish_reason=c.finish_reason,
                    logprobs=self._completion_logprobs(c.logprobs, 0) if request.logprobs is not None else None,
                    token_ids=c.token_ids if request.return_token_ids else None,
                )
                for i, c in enumerate(choices)
            ],
            usage=self._usage(prepared, choices),
        )
        return self._json(body)

    # --- running ----------------------------------------------------------------------------------

    async def _collect(self, handle: RequestHandle, raw: Request) -> list[_Choice]:
        choices = [_Choice() for _ in handle.seq_ids]

        async def gather():
            async for index, output in handle:
                choices[index].add(output)

        collecting = asyncio.ensure_future(gather())
        watching = asyncio.ensure_future(_client_gone(raw))
        try:
            await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
            if not collecting.done():
                raise p.APIError(499, "the client closed the request", None, "client_closed")
            collecting.result()
        except MoetierError as e:
            raise p.APIError(400, str(e)) from None
        except EngineFailed as e:
            raise p.APIError(500, str(e), None, "engine_failed", "server_error") from None
        finally:
            collecting.cancel()
            watching.cancel()
            handle.abort()
        return choices

    async def _events(self, handle: RequestHandle) -> AsyncIterator[tuple[int, RequestOutput] | p.APIError]:
        """The handle's outputs, an engine failure as a final APIError; aborts on any exit."""
        try:
            async for item in handle:
                yield item
        except MoetierError as e:
            yield p.APIError(400, str(e))
        except EngineFailed as e:
            yield p.APIError(500, str(e), None, "engine_failed", "server_error")
        finally:
            handle.abort()

    async def _chat_stream(self, request: p.ChatCompletionRequest, prepared: _Prepared,
                           handle: RequestHandle) -> AsyncIterator[str]:
        choices = [_Choice() for _ in handle.seq_ids]

        def chunk(choice_list: list[p.ChatChunkChoice], usage: p.Usage | None = None) -> str:
            body = p.ChatCompletionChunk(id=prepared.request_id, created=created, model=self.model_name,
                                         choices=choice_list, usage=usage)
            return _sse(body)

        created = p.now()
        yield chunk([p.ChatChunkChoice(index=i, delta=p.ChatDelta(role="assistant", content=""))
                     for i in range(len(choices))])
        async for event in self._events(handle):
            if isinstance(event, p.APIError):
                yield _sse_error(event)
                break
            index, output = event
            choices[index].add(output)
            yield chunk([p.ChatChunkChoice(
                index=index, delta=p.ChatDelta(content=output.new_text), finish_reason=output.finish_reason,
                logprobs=self._chat_logprobs(output.logprobs) if request.logprobs else None,
                token_ids=output.new_token_ids if request.return_token_ids else None,
            )])
        if request.include_usage:
            yield chunk([], self._usage(prepared, choices))
        yield "data: [DONE]\n\n"

    async def _completion_stream(self, request: p.CompletionRequest, prepared: _Prepared,
                                 handle: RequestHandle) -> AsyncIterator[str]:
        choices = [_Choice() for _ in handle.seq_ids]
        created = p.now()
        async for event in self._events(handle):
            if isinstance(event, p.APIError):
                yield _sse_error(event)
                break
            index, output = event
            offset = len(choices[index].text)
            choices[index].add(output)
            body = p.Completion(id=prepared.request_id, created=created, model=self.model_name, choices=[
                p.CompletionChoice(
                    index=index, text=output.new_text, finish_reason=output.finish_reason,
                    logprobs=self._completion_logprobs(output.logprobs or [], offset)
                    if request.logprobs is not None else None,
                    token_ids=output.new_token_ids if request.return_token_ids else None,
                )
            ])
            yield _sse(body)
        if request.include_usage:
            body = p.Completion(id=prepared.request_id, created=created, model=self.model_name, choices=[],
                                usage=self._usage(prepared, choices))
            yield _sse(body)
        yield "data: [DONE]\n\n"

    # --- formatting ---------------------------------------------------------------------------

    def _usage(self, prepared: _Prepared, choices: list[_Choice]) -> p.Usage:
        prompt_tokens = sum(prepared.prompt_lens)
        completion_tokens = sum(len(c.token_ids) for c in choices)
        return p.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                       total_tokens=prompt_tokens + completion_tokens)

    def _token_text(self, token_id: int) -> str:
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            return f"token_id:{token_id}"
        return tokenizer.hf.decode([token_id], skip_special_tokens=False)

    def _chat_logprobs(self, entries: list[dict] | None) -> p.ChatLogprobs:
        def top(token_id: int, logprob: float) -> p.TopLogprob:
            text = self._token_text(token_id)
            return p.TopLogprob(token=text, logprob=max(logprob, MIN_LOGPROB), bytes=list(text.encode()))

        content = []
        for entry in entries or []:
            chosen = top(entry["token_id"], entry["logprob"])
            content.append(p.TokenLogprob(**chosen.model_dump(), top_logprobs=[top(i, lp) for i, lp in entry["top"]]))
        return p.ChatLogprobs(content=content)

    def _completion_logprobs(self, entries: list[dict], offset: int) -> p.CompletionLogprobs:
        out = p.CompletionLogprobs()
        for entry in entries:
            text = self._token_text(entry["token_id"])
            out.tokens.append(text)
            out.token_logprobs.append(max(entry["logprob"], MIN_LOGPROB))
            out.top_logprobs.append({self._token_text(i): max(lp, MIN_LOGPROB) for i, lp in entry["top"]})
            out.text_offset.append(offset)
            offset += len(text)
        return out

    @staticmethod
    def _json(body) -> JSONResponse:
        data = body.model_dump(mode="json")
        for choice in data.get("choices", []):
            if choice.get("token_ids") is None:
                choice.pop("token_ids", None)
        return JSONResponse(data)


class _EngineStream(StreamingResponse):
    """Server-sent events that abort the request's sequences however the response ends
    (finished, client gone, cancelled at shutdown), even before the body was iterated."""

    def __init__(self, content: AsyncIterator[str], handle: RequestHandle):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self.handle = handle

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.abort()


async def _client_gone(raw: Request) -> None:
    """Returns when the client disconnects (the request body has already been read)."""
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(body) -> str:
    return f"data: {body.model_dump_json(exclude_none=True)}\n\n"


def _sse_error(error: p.APIError) -> str:
    return f"data: {json.dumps(error.body())}\n\n"
