"""The loop watchdog sees a blocking call on the loop as a stall of at least its length, and
reports the longest since a given moment."""

import asyncio
import time

from connector.loop_watch import LoopWatch


def test_a_blocking_call_on_the_loop_is_a_stall_of_its_length():
    async def scenario():
        watch = LoopWatch()
        watch.start()
        await asyncio.sleep(0.05)
        blocked_at = time.time()
        time.sleep(0.2)  # a synchronous call on the loop
        await asyncio.sleep(0.05)
        await watch.stop()
        return watch.longest, watch.longest_since(blocked_at), watch.longest_since(time.time())

    longest, since_block, since_now = asyncio.run(scenario())
    assert since_block >= 0.19
    assert longest >= since_block
    assert since_now == 0.0


def test_short_oversleeps_are_noise_and_old_stalls_age_out_of_since():
    watch = LoopWatch(threshold=0.005)
    watch.record(0.004, ended_at=100.0)
    assert watch.longest == 0.0
    watch.record(0.3, ended_at=200.0)
    watch.record(0.02, ended_at=300.0)
    assert watch.longest == 0.3
    assert watch.longest_since(250.0) == 0.02
    assert watch.longest_since(200.0) == 0.3
