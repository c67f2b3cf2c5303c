"""An asyncio loop on a background thread, for driving async servers from sync code
(tests, benchmarks, the demo)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine

__all__ = ["LoopThread"]


class LoopThread:
    """``loop = LoopThread(); loop.run(coro)``; ``loop.close()`` stops it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="geoserve-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Cancel what is still running on the loop (idle keep-alive handlers), stop it."""
        if self.thread.is_alive():
            async def cancel_the_rest() -> None:
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            try:
                self.run(cancel_the_rest(), timeout=10)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join(timeout=10)
        self.loop.close()
