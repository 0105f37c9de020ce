"""The channel's own opt-outs (an opt-out keyword, an Unsubscribe quick reply) are never lost: written to the shared state at once, then to the customer's tracker (the
opt-in slot set to False) without Rasa's fail-safe wrapper, which would turn a failed read into an
empty tracker whose save drops the event. A write that fails is retried in the background until
it is stored; until then the customer counts as opted out, on every instance."""

import asyncio
import logging
from typing import Any, AsyncContextManager, Callable, Dict, Set

from rasa.shared.core.events import SlotSet

from connector.care_state import CustomerState, unwrap
from connector.decisions import masked
from connector.outbound import Stores
from connector.tracker_reads import off_loop

logger = logging.getLogger(__name__)

RETRY_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class OptOuts:
    def __init__(
        self,
        opt_in_slot: str,
        stores: Callable[[], Stores],
        lock: Callable[[str], AsyncContextManager[Any]],
        retry_seconds=RETRY_SECONDS,
    ) -> None:
        self.opt_in_slot = opt_in_slot
        self.stores = stores
        self.lock = lock
        """Rasa's lock for the customer, so no turn on any instance saves over the slot."""
        self.retry_seconds = tuple(retry_seconds)
        self._unsaved: Set[str] = set()
        self._retries: Dict[str, "asyncio.Task[None]"] = {}

    def counts_as_opted_out(self, customer: CustomerState) -> bool:
        """An opt-out not yet stored everywhere: this process's (the state may be down too), or
        one the state flags that another process, or this one before a restart, did not finish:
        that one is finished from here."""
        if customer.opt_out_pending:
            self._unsaved.add(customer.sender_id)
            self._retry_soon(customer.sender_id)
        return customer.sender_id in self._unsaved

    async def opt_out(self, sender_id: str, why: str) -> None:
        self._unsaved.add(sender_id)
        if await self._store(sender_id):
            logger.info("Customer %s opted out (%s)", masked(sender_id), why)
            return
        logger.warning("Customer %s opted out (%s); not stored yet, retrying in the background", masked(sender_id), why)
        self._retry_soon(sender_id)

    def _retry_soon(self, sender_id: str) -> None:
        if sender_id not in self._retries:
            task = asyncio.get_running_loop().create_task(self._retry(sender_id))
            self._retries[sender_id] = task
            task.add_done_callback(lambda _: self._retries.pop(sender_id, None))

    async def _retry(self, sender_id: str) -> None:
        attempt = 0
        while True:
            await asyncio.sleep(self.retry_seconds[min(attempt, len(self.retry_seconds) - 1)])
            attempt += 1
            if await self._store(sender_id):
                logger.info("Opt-out of %s stored after %d retries", masked(sender_id), attempt)
                return

    async def _store(self, sender_id: str) -> bool:
        """State flag on, slot False in the tracker, flag off: True once all three held."""
        stores = self.stores()
        try:
            await stores.state.set_opt_out_pending(sender_id, True)
            async with self.lock(sender_id):
                await self._save_slot(unwrap(stores.tracker_store), sender_id)
            await stores.state.set_opt_out_pending(sender_id, False)
        except Exception as error:
            logger.error("Could not store the opt-out of %s: %s: %s", masked(sender_id), type(error).__name__, error)
            return False
        self._unsaved.discard(sender_id)
        return True

    async def _save_slot(self, store: Any, sender_id: str) -> None:
        async def save() -> None:
            tracker = await store.get_or_create_tracker(sender_id, append_action_listen=False)  # raises when down
            tracker.update(SlotSet(self.opt_in_slot, False))
            await store.save(tracker)

        await off_loop(store, save)

    def close(self) -> None:
        for task in list(self._retries.values()):
            task.cancel()
