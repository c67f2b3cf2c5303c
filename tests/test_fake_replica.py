"""The fake replica: OpenAI-compatible over real HTTP on 127.0.0.1, paced, cached, controllable."""

import asyncio
import json
import time

import aiohttp

from geoserve.signals import parse_metrics
from geoserve.testing import FakeReplica

LONG = "You are a careful assistant. " * 400  # ~11,600 chars, ~2,900 tokens


def run(coro):
    return asyncio.run(coro)


async def with_replica(body, **kw):
    replica = FakeReplica(speed=kw.pop("speed", 50.0), **kw)
    port = await replica.start()
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            return await body(replica, http)
    finally:
        await replica.stop()


def test_non_streaming_and_chat_completions():
    async def body(replica, http):
        async with http.post("/v1/completions", json={"model": "llama-70b", "prompt": "hello", "max_tokens": 5}) as r:
            assert r.status == 200 and r.headers["x-geoserve-replica"] == "fake-0"
            data = await r.json()
        assert data["choices"][0]["text"] == "tok0 tok1 tok2 tok3 tok4 " and data["usage"]["completion_tokens"] == 5
        async with http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}) as r:
            chat = await r.json()
        assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
        async with http.get("/v1/models") as r:
            assert (await r.json())["data"][0]["id"] == "llama-70b"

    run(with_replica(body))


def test_streaming_arrives_token_by_token_in_order():
    async def body(replica, http):
        pieces, stamps = [], []
        async with http.post("/v1/completions", json={"prompt": "count", "max_tokens": 20, "stream": True}) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async for line in r.content:
                line = line.strip()
                if not line:
                    continue
                stamps.append(time.perf_counter())
                payload = line[len(b"data: "):]
                if payload == b"[DONE]":
                    break
                pieces.append(json.loads(payload)["choices"][0]["text"])
        assert pieces == [f"tok{i} " for i in range(20)]
        assert stamps[-1] - stamps[0] > 0.005  # paced, not one burst: 19 steps of ~0.6 ms at speed 50

    run(with_replica(body))


def test_a_cached_prefix_shortens_time_to_first_token():
    async def ttft(http, prompt):
        t0 = time.perf_counter()
        async with http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "stream": True}) as r:
            async for line in r.content:
                if line.strip():
                    return time.perf_counter() - t0

    async def body(replica, http):
        cold = await ttft(http, LONG + "first question")
        warm = await ttft(http, LONG + "second question")
        assert replica.prefix_hits > 0
        assert warm < 0.5 * cold, (cold, warm)  # ~310 ms of prefill cold vs the ~49 ms floor warm, both / 5

    run(with_replica(body, speed=5.0))


def test_metrics_are_vllm_format_and_show_the_load():
    async def body(replica, http):
        async def slow_request():
            async with http.post("/v1/completions", json={"prompt": "x", "max_tokens": 200}) as r:
                await r.read()

        tasks = [asyncio.create_task(slow_request()) for _ in range(3)]
        await asyncio.sleep(0.05)
        async with http.get("/metrics") as r:
            load = parse_metrics(await r.text())
        await asyncio.gather(*tasks)
        assert load.engine == "vllm" and load.running + load.waiting == 3 and load.running >= 1

    run(with_replica(body, speed=20.0, slots=2))


def test_bad_input_gets_openai_style_errors():
    async def body(replica, http):
        cases = [
            (b"{not json", 400), (json.dumps({"max_tokens": 3}).encode(), 400),
            (json.dumps({"model": "gpt-9", "prompt": "x"}).encode(), 404),
            (json.dumps({"prompt": "x", "max_tokens": -1}).encode(), 400),
            (json.dumps([1, 2]).encode(), 400),
            (b'{"prompt": "' + b"a" * 5000 + b'"}', 413),
        ]
        for payload, status in cases:
            async with http.post("/v1/completions", data=payload, headers={"Content-Type": "application/json"}) as r:
                assert r.status == status, (payload[:30], r.status)
                if status != 413:
                    assert (await r.json())["error"]["code"] == status

    run(with_replica(body, max_body_bytes=4096))


def test_it_can_be_told_to_fail_slow_down_and_drain():
    async def body(replica, http):
        async with http.post("/admin", json={"fail": True}) as r:
            assert (await r.json())["fail"] is True
        async with http.get("/health") as r:
            assert r.status == 503
        async with http.post("/v1/completions", json={"prompt": "x"}) as r:
            assert r.status == 500
        await (await http.post("/admin", json={"fail": False, "slow": 4.0})).release()
        assert replica.slow == 4.0
        async def long():
            async with http.post("/v1/completions", json={"prompt": "x", "max_tokens": 30}) as r:
                return r.status
        inflight = asyncio.create_task(long())
        await asyncio.sleep(0.02)
        await (await http.post("/admin", json={"drain": True})).release()
        async with http.post("/v1/completions", json={"prompt": "y"}) as r:
            assert r.status == 503  # new work refused ...
        assert await inflight == 200  # ... in-flight work finishes
        async with http.post("/admin", json={"slow": "fast"}) as r:
            assert r.status == 400

    run(with_replica(body, speed=20.0))
