"""WhatsApp Business Cloud API channel for Rasa 3.6.

`connector.WhatsAppInput` is resolved lazily so that `python -m connector.simulator` starts
without importing Rasa.
"""

__all__ = ["WhatsAppInput", "WhatsAppOutput"]


def __getattr__(name: str):
    if name in __all__:
        from connector import channel

        return getattr(channel, name)
    raise AttributeError(f"module 'connector' has no attribute {name!r}")
