"""A fake inference replica: an OpenAI-compatible server paced like a Llama-70B.

``geoserve fake-replica --port 8001 --speed 10`` (``pip install "geoserve[gateway]"``).
Tests and demos use it in place of a GPU engine; it behaves like one where a router
can see it:

* ``POST /v1/completions`` and ``/v1/chat/completions``, streaming (SSE, OpenAI
  chunk format, ``data: [DONE]``) and not; ``GET /v1/models``; ``GET /health``;
* pacing from the simulator's latency model (``geoserve.sim.latency``): requests
  hold one of ``slots`` decode slots (the rest wait), prompts are prefilled one at a
  time (FIFO) for ``prefill_ms(uncached tokens)``, then each token takes one step at
  the current batch's step time; ``speed`` divides every duration (10 = ten times
  faster than a real 70B, so a test need not wait for a real one);
* a prefix cache: an LRU of the prompt's text-block hashes (``geoserve.prefix``,
  256-byte blocks ~ 64 tokens) with the replica's KV capacity, so a request whose
  prefix is cached has a visibly shorter time to first token;
* ``GET /metrics`` in vLLM's format (``vllm:num_requests_running``,
  ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``, the
  ``vllm:time_per_output_token_seconds`` histogram, prefix-cache
  counters), which ``geoserve.signals`` parses;
* ``POST /admin`` ``{"fail": true|false, "slow": factor, "drain": true|false,
  "break_after": n|null}``: fail every new request with 500 (health 503), slow
  everything down, drain (new requests 503, in-flight ones finish), or cut every
  stream after n tokens (a replica dying mid-stream).

Bad input gets OpenAI-style errors: malformed JSON or a missing prompt 400, another
model 404, a body over ``max_body_bytes`` 413.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from typing import Optional

from ..prefix import TEXT_BLOCK_TOKENS, block_hashes_from_text
from ..sim.latency import LatencyModel

__all__ = ["FakeReplica"]

CHARS_PER_TOKEN = 4


class FakeReplica:
    def __init__(self, model: str = "llama-70b", *, speed: float = 1.0, slots: int = 64,
                 kv_tokens: int = 918 * 512, latency: Optional[LatencyModel] = None,
                 max_body_bytes: int = 4 << 20, replica_id: str = "fake-0",
                 rtt_ms: Optional[dict] = None) -> None:
        if speed <= 0 or slots < 1:
            raise ValueError("speed must be > 0 and slots >= 1")
        self.model = model
        self.speed = speed
        self.slots = slots
        self.latency = latency or LatencyModel()
        self.max_body_bytes = max_body_bytes
        self.replica_id = replica_id
        # origin (x-geoserve-origin) -> round trip added before the first byte: a
        # replica "in another region" on loopback (the demo's regions)
        self.rtt_ms = dict(rtt_ms or {})
        self.cache: OrderedDict = OrderedDict()
        self.cache_blocks = max(1, kv_tokens // TEXT_BLOCK_TOKENS)
        self.running = 0
        self.waiting = 0
        self.failing = False
        self.draining = False
        self.slow = 1.0
        self.step_seconds = 0.0  # vLLM's time-per-output-token histogram: running sum and count
        self.steps = 0
        self.break_after: Optional[int] = None  # cut every stream after this many tokens
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.served = 0
        self._slots: Optional[asyncio.Semaphore] = None
        self._prefill: Optional[asyncio.Lock] = None
        self._runner = None
        self.port: Optional[int] = None

    # ------------------------------------------------------------ lifecycle
    def app(self):
        from aiohttp import web

        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/admin", self._admin)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        from aiohttp import web

        self._slots = asyncio.Semaphore(self.slots)
        self._prefill = asyncio.Lock()
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = self._runner.addresses[0][1]  # the bound port when 0 was asked
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------ the model
    def _seconds(self, ms: float) -> float:
        return ms * self.slow / self.speed / 1000.0

    async def _pace(self, ms: float) -> None:
        """Sleep the model's time; under half a millisecond only yield: the event
        loop's timers have millisecond resolution, so a 30 us sleep would take 1 ms."""
        seconds = self._seconds(ms)
        await asyncio.sleep(seconds if seconds >= 0.0005 else 0)

    async def _step(self) -> None:
        """One decode step at the current batch, recorded as the engine records it."""
        ms = self.latency.tpot_ms(self.running)
        self.step_seconds += self._seconds(ms)
        self.steps += 1
        await self._pace(ms)

    def _lookup(self, text: str) -> tuple[int, int]:
        """(prompt tokens, cached tokens): leading cached blocks, then all made recent."""
        blocks = block_hashes_from_text(text).tolist()
        hits = 0
        for h in blocks:
            if h in self.cache:
                hits += 1
            else:
                break
        for h in blocks:
            self.cache[h] = None
            self.cache.move_to_end(h)
        while len(self.cache) > self.cache_blocks:
            self.cache.popitem(last=False)
        self.prefix_queries += len(blocks)
        self.prefix_hits += hits
        tokens = max(1, len(text) // CHARS_PER_TOKEN)
        return tokens, min(tokens, hits * TEXT_BLOCK_TOKENS)

    @staticmethod
    def _prompt_text(body: dict) -> Optional[str]:
        if isinstance(body.get("prompt"), str):
            return body["prompt"]
        messages = body.get("messages")
        if isinstance(messages, list) and messages:
            parts = [m.get("content") for m in messages if isinstance(m, dict)]
            if all(isinstance(p, str) for p in parts):
                return "\n".join(parts)
        return None

    # ------------------------------------------------------------ handlers
    @staticmethod
    def _error(status: int, message: str, kind: str = "invalid_request_error"):
        from aiohttp import web

        return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)

    async def _completions(self, request):
        from aiohttp import web

        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._error(413, f"body over {self.max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return self._error(400, "body is not JSON")
        if not isinstance(body, dict):
            return self._error(400, "body must be a JSON object")
        if body.get("model") not in (None, self.model):
            return self._error(404, f"model {body.get('model')!r} is not served here ({self.model})", "not_found_error")
        text = self._prompt_text(body)
        if text is None:
            return self._error(400, "prompt (or messages with string content) is required")
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= 32_768:
            return self._error(400, "max_tokens must be an integer in [1, 32768]")
        if self.draining:
            return self._error(503, "draining", "unavailable")
        if self.failing:
            return self._error(500, "injected failure", "server_error")

        rtt = self.rtt_ms.get(request.headers.get("x-geoserve-origin", ""), 0.0)
        if rtt > 0:
            await asyncio.sleep(rtt / 1000.0)  # the network is not sped up
        chat = request.path.endswith("/chat/completions")
        created = int(time.time())
        rid = f"cmpl-{self.replica_id}-{self.served}"
        # vLLM's view: a request is waiting until its prefill starts, running after
        self.waiting += 1
        started = False
        await self._slots.acquire()
        try:
            async with self._prefill:  # one prompt at a time (FIFO), as the simulator's model
                self.waiting -= 1
                self.running += 1
                started = True
                tokens, cached = self._lookup(text)
                await self._pace(self.latency.prefill_ms(tokens - cached))
            if body.get("stream"):
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                                       "x-geoserve-replica": self.replica_id})
                await response.prepare(request)
                for i in range(max_tokens):
                    await self._step()
                    if self.break_after is not None and i >= self.break_after:
                        request.transport.abort()  # a replica dying mid-stream
                        return response
                    await response.write(b"data: " + json.dumps(self._chunk(rid, created, chat, i, i == max_tokens - 1)).encode() + b"\n\n")
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
                self.served += 1
                return response
            for i in range(max_tokens):
                await self._step()
            self.served += 1
            content = "".join(f"tok{i} " for i in range(max_tokens))
            choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "length"} if chat
                      else {"index": 0, "text": content, "finish_reason": "length"})
            return web.json_response(
                {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                 "model": self.model, "choices": [choice],
                 "usage": {"prompt_tokens": tokens, "completion_tokens": max_tokens, "total_tokens": tokens + max_tokens,
                           "prompt_tokens_details": {"cached_tokens": cached}}},
                headers={"x-geoserve-replica": self.replica_id},
            )
        finally:
            if started:
                self.running -= 1
            else:
                self.waiting -= 1
            self._slots.release()

    def _chunk(self, rid: str, created: int, chat: bool, i: int, last: bool) -> dict:
        piece = f"tok{i} "
        if chat:
            choice = {"index": 0, "delta": {"content": piece}, "finish_reason": "length" if last else None}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model, "choices": [choice]}
        choice = {"index": 0, "text": piece, "finish_reason": "length" if last else None}
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model, "choices": [choice]}

    async def _models(self, request):
        from aiohttp import web

        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "geoserve"}]})

    async def _health(self, request):
        from aiohttp import web

        if self.failing or self.draining:
            return web.Response(status=503, text="unhealthy" if self.failing else "draining")
        return web.Response(text="ok")

    async def _metrics(self, request):
        from aiohttp import web

        return web.Response(text=self.metrics_text(), content_type="text/plain")

    def metrics_text(self) -> str:
        """What ``GET /metrics`` answers now (vLLM's format)."""
        label = f'{{model_name="{self.model}"}}'
        usage = len(self.cache) / self.cache_blocks
        lines = [
            "# TYPE vllm:num_requests_running gauge", f"vllm:num_requests_running{label} {float(self.running)}",
            "# TYPE vllm:num_requests_waiting gauge", f"vllm:num_requests_waiting{label} {float(self.waiting)}",
            "# TYPE vllm:kv_cache_usage_perc gauge", f"vllm:kv_cache_usage_perc{label} {usage}",
            "# TYPE vllm:prefix_cache_queries counter", f"vllm:prefix_cache_queries_total{label} {float(self.prefix_queries)}",
            "# TYPE vllm:prefix_cache_hits counter", f"vllm:prefix_cache_hits_total{label} {float(self.prefix_hits)}",
            "# TYPE vllm:time_per_output_token_seconds histogram",
            f'vllm:time_per_output_token_seconds_bucket{{model_name="{self.model}",le="+Inf"}} {float(self.steps)}',
            f"vllm:time_per_output_token_seconds_sum{label} {self.step_seconds}",
            f"vllm:time_per_output_token_seconds_count{label} {float(self.steps)}",
        ]
        return "\n".join(lines) + "\n"

    async def _admin(self, request):
        from aiohttp import web

        try:
            body = await request.json()
        except ValueError:
            return self._error(400, "body is not JSON")
        if not isinstance(body, dict):
            return self._error(400, "body must be a JSON object")
        if "fail" in body:
            self.failing = bool(body["fail"])
        if "drain" in body:
            self.draining = bool(body["drain"])
        if "break_after" in body:
            value = body["break_after"]
            self.break_after = value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
        if "slow" in body:
            slow = body["slow"]
            if not isinstance(slow, (int, float)) or isinstance(slow, bool) or not slow > 0:
                return self._error(400, "slow must be a number > 0")
            self.slow = float(slow)
        return web.json_response({"fail": self.failing, "drain": self.draining, "slow": self.slow})
