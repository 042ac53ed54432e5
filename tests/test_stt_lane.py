"""The STT lane's ordering on plain Python callables: no engine, no audio."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from speechpipe.pipeline.stt_lane import SerialLane


@pytest.fixture
def executor():
    pool = ThreadPoolExecutor(max_workers=4)  # several threads: only the lane can keep the order
    yield pool
    pool.shutdown(wait=True)


def record(log: list[int], i: int, pause_s: float = 0.0) -> int:
    if pause_s:
        time.sleep(pause_s)  # earlier calls take longer: a free thread would overtake them
    log.append(i)
    return i * 10


async def test_calls_run_in_submission_order(executor):
    lane = SerialLane(executor)
    log: list[int] = []
    futures = [lane.run(record, log, i, 0.002 * (10 - i)) for i in range(10)]
    assert await asyncio.gather(*futures) == [i * 10 for i in range(10)]
    assert log == list(range(10))


async def test_calls_submitted_from_callbacks_keep_their_place(executor):
    lane = SerialLane(executor)
    log: list[int] = []
    from_callbacks: list[asyncio.Future] = []

    def chain(fut: asyncio.Future) -> None:
        # Like a partial's done-callback asking for more work: it queues behind what is already there.
        i = fut.result() // 10
        if i < 3:
            from_callbacks.append(lane.run(record, log, 100 + i))

    for i in range(5):
        lane.run(record, log, i, 0.001 * (5 - i)).add_done_callback(chain)
    await lane.run(record, log, 5)  # by now every callback of 0-4 has run (each long before 5 ends)
    assert len(from_callbacks) == 3
    await asyncio.gather(*from_callbacks)
    assert log[:6] == [0, 1, 2, 3, 4, 5]
    assert sorted(log[6:]) == [100, 101, 102]  # queued after the call that was the tail at the time


async def test_a_failing_call_does_not_stop_the_ones_after_it(executor):
    lane = SerialLane(executor)
    log: list[int] = []

    def boom() -> None:
        raise RuntimeError("decoder crashed")

    first = lane.run(record, log, 1, 0.005)
    bad = lane.run(boom)
    after = lane.run(record, log, 2)
    assert await after == 20
    assert await first == 10
    with pytest.raises(RuntimeError, match="decoder crashed"):
        await bad
    assert log == [1, 2]


async def test_results_come_back_to_their_own_futures(executor):
    lane = SerialLane(executor)
    futures = {word: lane.run(str.upper, word) for word in ("one", "two", "three")}
    results = {word: await fut for word, fut in futures.items()}
    assert results == {"one": "ONE", "two": "TWO", "three": "THREE"}


async def test_one_call_at_a_time_on_executor_threads(executor):
    lane = SerialLane(executor)
    running, overlaps, threads = [0], [], set()
    guard = threading.Lock()

    def work() -> None:
        with guard:
            running[0] += 1
            overlaps.append(running[0])
        threads.add(threading.current_thread().name)
        time.sleep(0.001)
        with guard:
            running[0] -= 1

    await asyncio.gather(*(lane.run(work) for _ in range(8)))
    assert max(overlaps) == 1
    assert threading.main_thread().name not in threads  # never on the event loop's thread
