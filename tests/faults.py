"""Fault injection over real sockets: a TCP proxy that can go silent or cut connections."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import Future
from typing import Any

from tests.harness import free_port


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target port, on an event loop in its own thread (so the
    tests' blocking helpers never stall it).

    ``freeze()`` makes every current connection a black hole (open, delivering nothing either
    way), as a half-open connection or a middlebox that lost its state would; connections made
    afterwards work normally. ``cut()`` closes every current connection. While ``refusing``
    is set, new connections are closed as soon as they are accepted.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter, asyncio.Event]] = []
        self.refusing = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _call(self, coroutine: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(10)

    def start(self) -> TcpProxy:
        self._thread.start()

        async def listen() -> None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

        self._call(listen())
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        frozen = asyncio.Event()
        self._links.append((writer, up_writer, frozen))
        await asyncio.gather(
            self._pump(reader, up_writer, frozen), self._pump(up_reader, writer, frozen)
        )

    @staticmethod
    async def _pump(
        source: asyncio.StreamReader, sink: asyncio.StreamWriter, frozen: asyncio.Event
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                if frozen.is_set():
                    continue  # swallowed: the peer hears nothing, and no error either
                sink.write(data)
                await sink.drain()
        sink.close()

    def freeze(self) -> None:
        async def freeze() -> None:
            for _, _, frozen in self._links:
                frozen.set()

        self._call(freeze())

    def cut(self) -> None:
        async def cut() -> None:
            for downstream, upstream, _ in self._links:
                downstream.close()
                upstream.close()
            self._links.clear()

        self._call(cut())

    def stop(self) -> None:
        self.cut()

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
