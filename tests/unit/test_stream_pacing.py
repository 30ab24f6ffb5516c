# SPDX-License-Identifier: Apache-2.0
"""e2e_llm.stream_pacing: the first chunks of a stream go out at once, the rest in groups at
most one per interval, the interval grows with the number of open streams up to its cap, the end
and errors are passed on at once, and a closed stream stops its reader."""

from __future__ import annotations

import asyncio

import pytest

from e2e_llm.stream_pacing import StreamPacer


async def _chunks(n: int, gap_s: float = 0.0, fail_after: int | None = None, log: list | None = None):
    for i in range(n):
        if fail_after is not None and i == fail_after:
            raise RuntimeError("engine died")
        if gap_s:
            await asyncio.sleep(gap_s)
        if log is not None:
            log.append(i)
        yield f"c{i}"


async def _collect(pacer: StreamPacer, chunks) -> list[tuple[float, list]]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    return [(loop.time() - start, batch) async for batch in pacer.batched(chunks)]


def test_the_head_goes_out_at_once_and_the_rest_is_grouped_by_interval():
    out = asyncio.run(_collect(StreamPacer(100, head=2), _chunks(12, gap_s=0.02)))
    batches = [b for _, b in out]
    assert batches[:2] == [["c0"], ["c1"]]
    assert out[0][0] < 0.05  # the first chunk was not held back
    assert [c for b in batches for c in b] == [f"c{i}" for i in range(12)]
    assert len(batches) < 12 - 2 + 2  # grouped after the head
    assert all(len(b) >= 1 for b in batches)  # never an empty message
    gaps = [b[0] - a[0] for a, b in zip(out[2:], out[3:])]
    assert all(g >= 0.09 for g in gaps[:-1])  # at most one message per interval (the end may come sooner)


def test_head_chunks_produced_in_one_step_go_out_as_one_message_at_once():
    # vLLM yields a chat stream's role chunk and first token in the same engine step.
    async def engine():
        await asyncio.sleep(0.02)  # prefill
        yield "role"
        yield "first"
        for i in range(6):
            await asyncio.sleep(0.02)
            yield f"t{i}"

    out = asyncio.run(_collect(StreamPacer(2000, head=2), engine()))
    assert out[0][1] == ["role", "first"]
    assert out[0][0] < 0.1  # not held for the interval
    assert [c for _, b in out for c in b] == ["role", "first"] + [f"t{i}" for i in range(6)]
    assert len(out) == 2  # the rest, ~120 ms of tokens, in one group (interval 2 s, the end flushed at once)


def test_interval_zero_sends_every_chunk_alone():
    out = asyncio.run(_collect(StreamPacer(0), _chunks(5)))
    assert [b for _, b in out] == [[f"c{i}"] for i in range(5)]


def test_the_end_of_a_stream_is_flushed_at_once_not_after_the_interval():
    out = asyncio.run(_collect(StreamPacer(5000, head=1), _chunks(4)))
    assert [c for _, b in out for c in b] == ["c0", "c1", "c2", "c3"]
    assert out[-1][0] < 1.0


def test_the_interval_grows_with_open_streams_up_to_its_cap():
    pacer = StreamPacer(500, max_interval_ms=2000, messages_per_s=32)
    for open_streams, expected in ((0, 0.5), (1, 0.5), (16, 0.5), (32, 1.0), (48, 1.5), (64, 2.0), (200, 2.0)):
        pacer.open = open_streams
        assert pacer.current_interval_s() == pytest.approx(expected)
    fixed = StreamPacer(500)  # no message budget: the interval is fixed
    fixed.open = 64
    assert fixed.current_interval_s() == 0.5


def test_open_streams_are_counted_while_they_run():
    pacer = StreamPacer(50, max_interval_ms=1000, messages_per_s=10)
    seen: list[int] = []

    async def main():
        async def one():
            async for _ in pacer.batched(_chunks(4, gap_s=0.01)):
                seen.append(pacer.open)

        await asyncio.gather(*(one() for _ in range(5)))

    asyncio.run(main())
    assert max(seen) == 5
    assert pacer.open == 0


def test_many_open_streams_send_fewer_messages():
    async def messages(streams: int, pacer: StreamPacer) -> int:
        counts = []

        async def one():
            counts.append(len([b async for b in pacer.batched(_chunks(20, gap_s=0.02))]))

        await asyncio.gather(*(one() for _ in range(streams)))
        return max(counts)

    fixed = asyncio.run(messages(20, StreamPacer(50, head=1)))
    paced = asyncio.run(messages(20, StreamPacer(50, head=1, max_interval_ms=400, messages_per_s=50)))
    assert paced < fixed


def test_an_error_is_raised_after_the_chunks_read_before_it():
    got: list = []

    async def main():
        async for batch in StreamPacer(50, head=1).batched(_chunks(5, fail_after=3)):
            got.extend(batch)

    with pytest.raises(RuntimeError, match="engine died"):
        asyncio.run(main())
    assert got == ["c0", "c1", "c2"]


def test_closing_a_stream_stops_reading_the_engine():
    read: list[int] = []

    async def main():
        pacer = StreamPacer(20, head=1)
        stream = pacer.batched(_chunks(1000, gap_s=0.005, log=read))
        async for batch in stream:
            if "c3" in batch or len(read) > 5:
                break
        await stream.aclose()
        n = len(read)
        await asyncio.sleep(0.1)
        return n, pacer.open

    n, still_open = asyncio.run(main())
    assert len(read) <= n + 1  # nothing read after the client went away
    assert still_open == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"interval_ms": -1}, "interval_ms must be >= 0"),
    ({"interval_ms": 500, "messages_per_s": 0}, "messages_per_s must be > 0"),
    ({"interval_ms": 500, "max_interval_ms": 100}, r"max_interval_ms \(100\) must be >= interval_ms \(500\)"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StreamPacer(**kwargs)
