"""Rasa's RedisLockStore with every ticket change made atomic.

Rasa 3.6 issues, serves and cleans up tickets with read-modify-write sequences (GET, change,
SET). Two instances touching one conversation at the same moment overwrite each other: a ticket
is lost (its request then waits out the 60 s lock lifetime) or handed out twice (two turns run at
once, and the care window's one-template-per-lapsed-window rule could be broken). Here each
change runs in a Redis WATCH/MULTI transaction, retried if the lock changed underneath.

endpoints.yml:
    lock_store:
      type: connector.lock_store.AtomicRedisLockStore
      url: 127.0.0.1
      port: 6379
      db: 1
"""

import json
from typing import Any, Callable, Optional, TypeVar

from rasa.core.lock import TicketLock
from rasa.core.lock_store import LOCK_LIFETIME, LockError, RedisLockStore
from rasa.utils.endpoints import EndpointConfig

T = TypeVar("T")


class AtomicRedisLockStore(RedisLockStore):
    def __init__(self, endpoint_config: Optional[EndpointConfig] = None, **kwargs: Any) -> None:
        if endpoint_config is not None:  # Rasa builds custom lock stores from the endpoint block
            kwargs = {**endpoint_config.kwargs, **kwargs}
            kwargs.setdefault("host", endpoint_config.url or "localhost")
        super().__init__(**kwargs)

    def issue_ticket(self, conversation_id: str, lock_lifetime: float = LOCK_LIFETIME) -> int:
        try:
            return self._change(conversation_id, lambda lock: lock.issue_ticket(lock_lifetime), create=True)
        except Exception as error:
            raise LockError(f"Error while acquiring lock. Error:\n{error}") from error

    def update_lock(self, conversation_id: str) -> None:
        self._change(conversation_id, lambda lock: lock.remove_expired_tickets())

    def finish_serving(self, conversation_id: str, ticket_number: int) -> None:
        self._change(conversation_id, lambda lock: lock.remove_ticket_for(ticket_number))

    def cleanup(self, conversation_id: str, ticket_number: int) -> None:
        """Finish this ticket and drop the lock if nobody waits, as one step: otherwise a ticket
        issued in between would be deleted with the lock."""

        def finish(lock: TicketLock) -> bool:
            lock.remove_ticket_for(ticket_number)
            return not lock.is_someone_waiting()

        self._change(conversation_id, finish, delete_if=lambda nobody_waiting: nobody_waiting)

    def _change(
        self,
        conversation_id: str,
        change: Callable[[TicketLock], T],
        create: bool = False,
        delete_if: Callable[[T], bool] = lambda _: False,
    ) -> Optional[T]:
        key = self.key_prefix + conversation_id

        def transaction(pipe: Any) -> Optional[T]:
            serialised = pipe.get(key)
            if serialised:
                lock = TicketLock.from_dict(json.loads(serialised))
            elif create:
                lock = TicketLock(conversation_id)
            else:
                return None
            result = change(lock)
            pipe.multi()
            if delete_if(result):
                pipe.delete(key)
            else:
                pipe.set(key, lock.dumps())
            return result

        return self.red.transaction(transaction, key, value_from_callable=True)
