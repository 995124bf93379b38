"""`moetier serve` against the official openai client: chat and completions, streaming and not,
continuous batching equal to offline greedy, disconnects, 429, metrics, graceful shutdown."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from checkpoints import make_checkpoint
from moetier import LLM, SamplingParams
from parity import TIE_MARGIN
from servers import MODEL_NAME, live_server

MAX_TOKENS = 24
CHATS = [[{"role": "user", "content": f"def f{i}(x): return x * {i}"}] for i in range(16)]
TOKEN_PROMPTS = [[(7 * i + j * 13) % 300 + 5 for j in range(3 + 4 * i)] for i in range(16)]  # 3..63 tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve-qwen3")
    make_checkpoint("qwen3_moe", path)
    return path


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), dtype="float32", max_model_len=128)


@pytest.fixture(scope="module")
def server(model_dir):
    # 8 running sequences and 32-token steps: 32 requests queue, join and leave, long prompts are chunked.
    with live_server(model_dir, max_queue=64, max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32) as srv:
        yield srv


@pytest.fixture(scope="module")
def one_slot(model_dir):
    """One running sequence and one waiting, with slowed steps so streams outlive the test's actions."""
    with live_server(model_dir, max_queue=1, max_model_len=256, max_num_seqs=1) as srv:
        srv.slow_down(0.02)
        yield srv


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _assert_same_greedy(llm: LLM, prompt: list[int], ours: list[int], theirs: list[int]) -> None:
    """Exact, or equal up to a step where the offline top-2 logits nearly tie (as tests/parity.py)."""
    if ours == theirs:
        return
    step = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    top2 = llm.score(prompt + theirs[:step])[-1].topk(2).values
    assert float(top2[0] - top2[1]) < TIE_MARGIN, f"greedy token {step} differs: {ours} vs {theirs}"


# --- the openai client ----------------------------------------------------------------------------


def test_models_and_health(server):
    client = _client(server)
    [model] = client.models.list().data
    assert model.id == MODEL_NAME
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_chat_non_streaming_usage_and_logprobs(server, llm):
    messages = CHATS[0]
    resp = _client(server).chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=3,
        extra_body={"return_token_ids": True},
    )
    [choice] = resp.choices
    [expected] = llm.chat(messages, SamplingParams(max_tokens=MAX_TOKENS))
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert resp.usage.prompt_tokens == len(llm.tokenizer.encode_chat(messages))
    assert resp.usage.completion_tokens == len(expected.token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    content = choice.logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0 and entry.logprob <= entry.top_logprobs[0].logprob + 1e-5  # greedy takes the top


def test_chat_streaming_include_usage(server, llm):
    messages = CHATS[1]
    stream = _client(server).chat.completions.create(
        model=MODEL_NAME, messages=messages, max_completion_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}, logprobs=True,
    )
    chunks = list(stream)
    [expected] = llm.chat(messages, SamplingParams(max_tokens=MAX_TOKENS))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs) == len(
        expected.token_ids)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        len(llm.tokenizer.encode_chat(messages)), len(expected.token_ids))


def test_completions_text_and_token_prompts(server, llm):
    client = _client(server)
    prompts = ["def add(a, b):", TOKEN_PROMPTS[3]]
    expected = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS))
    for prompt, exp in zip(prompts, expected):
        resp = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                         logprobs=2)
        [choice] = resp.choices
        assert choice.text == exp.text
        assert resp.usage.prompt_tokens == len(exp.prompt_token_ids)
        assert resp.usage.completion_tokens == len(exp.token_ids) == len(choice.logprobs.token_logprobs)
        assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    # A list of prompts: choices in prompt order, usage summed.
    resp = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=MAX_TOKENS, temperature=0)
    assert [c.text for c in resp.choices] == [e.text for e in expected]
    assert resp.usage.prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)
    assert resp.usage.completion_tokens == sum(len(e.token_ids) for e in expected)


def test_completions_streaming_stop_and_seeded_n(server, llm):
    client = _client(server)
    prompt = TOKEN_PROMPTS[5]
    [free] = llm.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    middle = len(free.text) // 2
    stop = next(free.text[i:i + 2] for i in range(middle, len(free.text) - 1) if "\ufffd" not in free.text[i:i + 2])
    stream = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                       stop=[stop], stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == free.text[: free.text.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    # n choices, seeded: reproducible across requests, different from each other.
    kwargs = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 12, "temperature": 1.0, "n": 3, "seed": 7,
              "extra_body": {"ignore_eos": True, "return_token_ids": True}}
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    ids = [c.token_ids for c in first.choices]
    assert ids == [c.token_ids for c in again.choices]
    assert len({tuple(i) for i in ids}) == 3
    assert first.usage.completion_tokens == 36


def test_errors_have_openai_shape(server):
    client = _client(server)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=CHATS[0])
    assert e.value.response.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=10_000)
    assert e.value.response.json()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt=list(range(5, 200)), max_tokens=1)  # prompt > context
    assert "max_model_len" in e.value.response.json()["error"]["message"]
    for bad in ({"tools": [{"type": "function", "function": {"name": "f"}}]}, {"response_format": {"type": "json_object"}},
                {"temperature": 3}, {"n": 0}, {"max_tokens": 0}, {"top_logprobs": 30, "logprobs": True}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL_NAME, messages=CHATS[0], **bad)
        assert set(e.value.response.json()["error"]) == {"message", "type", "param", "code"}, bad
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt="x", best_of=2)
    assert client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2).usage.completion_tokens <= 2


# --- continuous batching --------------------------------------------------------------------------


def test_32_concurrent_streams_equal_offline_greedy(server, llm):
    async def completion(client, prompt):
        stream = await client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"return_token_ids": True})
        text, ids, usage = "", [], None
        async for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                text, ids = text + choice.text, ids + choice.token_ids
        return text, ids, usage

    async def chat(client, messages):
        stream = await client.chat.completions.create(
            model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"return_token_ids": True})
        text, ids, usage = "", [], None
        async for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                text, ids = text + (choice.delta.content or ""), ids + (getattr(choice, "token_ids", None) or [])
        return text, ids, usage

    async def all_streams():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*[completion(client, p) for p in TOKEN_PROMPTS],
                                        *[chat(client, m) for m in CHATS])
        finally:
            await client.close()

    results = asyncio.run(all_streams())
    params = SamplingParams(max_tokens=MAX_TOKENS)
    expected = llm.generate(TOKEN_PROMPTS, params) + llm.chat(CHATS, params)
    assert len(results) == 32
    for (text, ids, usage), exp in zip(results, expected):
        _assert_same_greedy(llm, exp.prompt_token_ids, ids, exp.token_ids)
        if ids == exp.token_ids:
            assert text == exp.text
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(exp.prompt_token_ids), len(ids))
    server.wait_idle()


# --- capacity: disconnects and 429 ----------------------------------------------------------------


def _open_stream(client: httpx.Client, max_tokens: int = 200):
    body = {"model": MODEL_NAME, "prompt": [5, 6, 7], "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    return client.stream("POST", "/v1/completions", json=body)


def _events(response):
    """The stream's events. Keep the generator: dropping it half-read closes the connection (a disconnect)."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield json.loads(line[len("data: "):])


def _metric(srv, name: str) -> float:
    text = httpx.get(srv.url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def _wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_queue_full_gets_429(one_slot):
    one_slot.wait_idle()
    rejected = _metric(one_slot, 'moetier_requests_total{endpoint="/v1/completions",status="429"}')
    with httpx.Client(base_url=one_slot.url, timeout=30) as a, httpx.Client(base_url=one_slot.url, timeout=30) as b:
        with _open_stream(a) as running, _open_stream(b) as queued:
            running_events = _events(running)
            next(running_events)
            assert queued.status_code == 200
            resp = httpx.post(one_slot.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "x"})
            assert resp.status_code == 429
            assert resp.headers["retry-after"] == "1"
            assert resp.json()["error"]["code"] == "queue_full"
            with pytest.raises(openai.RateLimitError):
                _client(one_slot).completions.create(model=MODEL_NAME, prompt="x", max_tokens=1)
    one_slot.wait_idle()
    assert _metric(one_slot, 'moetier_requests_total{endpoint="/v1/completions",status="429"}') == rejected + 2


def test_disconnect_mid_stream_frees_the_slot(one_slot):
    """max_num_seqs=1: the running client goes away; the queued request is admitted at once and streams."""
    one_slot.wait_idle()
    aborts = _metric(one_slot, 'moetier_sequences_finished_total{reason="abort"}')
    with httpx.Client(base_url=one_slot.url, timeout=30) as a, httpx.Client(base_url=one_slot.url, timeout=30) as b:
        with _open_stream(a, max_tokens=250) as first:  # 250 tokens at >= 20 ms a step: 5 s if left alone
            first_events = _events(first)
            next(first_events)
            with _open_stream(b, max_tokens=250) as second:
                assert one_slot.async_engine.num_in_flight == 2
                first.close()
                _wait_for(lambda: _metric(one_slot, 'moetier_sequences_finished_total{reason="abort"}') == aborts + 1,
                          timeout=3)
                assert next(_events(second))["choices"][0]["index"] == 0
    one_slot.wait_idle(timeout=3)  # no sequence left and every KV block free
    assert _metric(one_slot, 'moetier_sequences_finished_total{reason="abort"}') == aborts + 2
    resp = _client(one_slot).completions.create(model=MODEL_NAME, prompt=[5, 6, 7], max_tokens=4,
                                                extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 4


def test_disconnect_while_waiting_for_a_non_streaming_answer_aborts(one_slot):
    one_slot.wait_idle()
    aborts = _metric(one_slot, 'moetier_sequences_finished_total{reason="abort"}')
    body = {"model": MODEL_NAME, "prompt": [5, 6, 7], "max_tokens": 250, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.3 s and closes the connection
        httpx.post(one_slot.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    _wait_for(lambda: _metric(one_slot, 'moetier_sequences_finished_total{reason="abort"}') == aborts + 1, timeout=3)
    one_slot.wait_idle(timeout=3)


def test_metrics_report_tokens_latency_and_offload_hook(server):
    before = _metric(server, "moetier_generation_tokens_total")
    resp = _client(server).completions.create(model=MODEL_NAME, prompt=[9, 9, 9], max_tokens=5,
                                              extra_body={"ignore_eos": True})
    assert _metric(server, "moetier_generation_tokens_total") == before + resp.usage.completion_tokens
    text = httpx.get(server.url + "/metrics").text
    for name in ("moetier_time_to_first_token_seconds_bucket", "moetier_time_per_output_token_seconds_count",
                 "moetier_generation_tokens_per_second", "moetier_queue_depth", "moetier_running_sequences",
                 "moetier_prompt_tokens_total", 'moetier_requests_total{endpoint="/v1/completions",status="200"}'):
        assert name in text
    assert "moetier_expert_cache_hit_rate" not in text  # resident: no expert cache
    server.engine.offload_stats = lambda: {"hit_rate": 0.75}  # the plumbing; the counters: test_offload
    try:
        server.async_engine._next_offload_stats = 0.0
        _client(server).completions.create(model=MODEL_NAME, prompt=[9], max_tokens=2)
        assert "moetier_expert_cache_hit_rate 0.75" in httpx.get(server.url + "/metrics").text
    finally:
        del server.engine.offload_stats


# --- shutdown -------------------------------------------------------------------------------------


def test_sigterm_lets_streams_finish_then_exits(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "moetier.cli", "serve", "--model", str(model_dir), "--dtype", "float32",
           "--max-model-len", "256", "--port", str(port), "--served-model-name", "served", "--max-queue", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        events = []
        body = {"model": "served", "prompt": [5, 6, 7], "max_tokens": 250, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as resp:
            lines = resp.iter_lines()
            events.append(next(line for line in lines if line.startswith("data: ")))
            proc.send_signal(signal.SIGTERM)
            events += [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert len(events) == 251  # 250 tokens, then [DONE]
        # uvicorn re-raises the signal once it has shut down, so the exit status reports SIGTERM.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0]
    assert "Waiting for connections to close" in output  # the stream was still open at the signal
    assert "Application shutdown complete" in output


def test_shutdown_timeout_cancels_streams_and_stops_the_engine(model_dir):
    with live_server(model_dir, shutdown_timeout=0.5, max_model_len=256, max_num_seqs=2) as srv:
        srv.slow_down(0.02)
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=30, json={
            "model": MODEL_NAME, "prompt": [5, 6, 7], "max_tokens": 250, "stream": True, "ignore_eos": True,
        }) as resp:
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            start = time.monotonic()
            threading.Thread(target=setattr, args=(srv.server, "should_exit", True)).start()
            try:
                for _ in lines:
                    pass
            except httpx.HTTPError:
                pass  # the connection was cut when the shutdown timeout cancelled the response
        deadline = time.monotonic() + 10
        while srv.async_engine.alive or srv.async_engine._thread.is_alive():
            assert time.monotonic() < deadline, "the engine thread did not stop"
            time.sleep(0.01)
        assert time.monotonic() - start < 4  # well before the stream's 5 s
        assert not srv.engine.has_unfinished()
