"""The event hub: every subscriber gets every event in order, a slow one is closed (never a
queue that grows), shutdown closes them all; and the SSE wire format."""

from __future__ import annotations

import json

from radio.events import QUEUE_SIZE, EventHub, is_close, next_event, sse_block


async def test_subscribers_get_every_event_in_order():
    hub = EventHub()
    a, b = hub.subscribe(), hub.subscribe()
    hub.publish("prompt", {"prompt": "jazz"})
    hub.publish("health", {"ok": True})
    for q in (a, b):
        assert [await next_event(q, 1), await next_event(q, 1)] == [
            ("prompt", {"prompt": "jazz"}),
            ("health", {"ok": True}),
        ]
    assert await next_event(a, timeout=0.01) is None  # quiet: the caller sends a keep-alive
    hub.unsubscribe(b)
    hub.publish("x", 1)
    assert b.empty() and len(hub) == 1


async def test_a_subscriber_that_does_not_keep_up_is_closed():
    hub = EventHub()
    slow, fast = hub.subscribe(), hub.subscribe()
    for i in range(QUEUE_SIZE):
        hub.publish("n", i)
        assert await next_event(fast, 1) == ("n", i)
    hub.publish("n", QUEUE_SIZE)  # one too many for the slow one
    assert hub.dropped == 1 and len(hub) == 1
    items = [slow.get_nowait() for _ in range(slow.qsize())]
    assert is_close(items[-1]) and len(items) == QUEUE_SIZE  # its last item says: closed
    assert await next_event(fast, 1) == ("n", QUEUE_SIZE)


async def test_close_ends_every_subscriber():
    hub = EventHub()
    qs = [hub.subscribe() for _ in range(3)]
    hub.publish("n", 1)
    hub.close()
    assert len(hub) == 0
    for q in qs:
        assert await next_event(q, 1) == ("n", 1) and is_close(await next_event(q, 1))


def test_sse_block_is_one_message():
    block = sse_block("prompt", {"prompt": "café\nnights"})
    assert block.startswith(b"event: prompt\ndata: ") and block.endswith(b"\n\n")
    assert block.count(b"\n") == 3  # JSON escapes the newline
    assert json.loads(block.decode().split("data: ", 1)[1]) == {"prompt": "café\nnights"}
