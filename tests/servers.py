"""A live `moetier serve` in this process: uvicorn in a thread on 127.0.0.1, always stopped."""

import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from moetier.config import EngineConfig
from moetier.engine.engine import Engine
from moetier.serve.app import build_app, uvicorn_server
from moetier.serve.async_engine import AsyncEngine

MODEL_NAME = "tiny-qwen3"


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    async_engine: AsyncEngine
    server: object  # uvicorn.Server

    @property
    def engine(self) -> Engine:
        return self.async_engine.engine

    def slow_down(self, seconds_per_step: float) -> None:
        """Makes every engine step take at least this long, so streams outlive the test's actions."""
        engine = self.engine
        step = type(engine).step

        def slow_step():
            time.sleep(seconds_per_step)
            return step(engine)

        engine.step = slow_step

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no sequence is in flight and every KV block is free again."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            idle = self.async_engine.num_in_flight == 0 and not self.engine.has_unfinished()
            if idle and self.engine.blocks.num_free == self.engine.resolved.num_kv_blocks:
                return
            time.sleep(0.01)
        raise AssertionError("the server did not become idle")


@contextmanager
def live_server(model_dir, max_queue: int = 64, shutdown_timeout: float = 5.0, **engine_options):
    engine = Engine(EngineConfig(model=str(model_dir), dtype="float32", **engine_options))
    async_engine = AsyncEngine(engine, max_queue)
    app = build_app(async_engine, MODEL_NAME)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn_server(app, "127.0.0.1", sock.getsockname()[1], shutdown_timeout, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        yield LiveServer(f"http://127.0.0.1:{sock.getsockname()[1]}", async_engine, server)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the test server did not stop"
