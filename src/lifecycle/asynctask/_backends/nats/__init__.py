"""NATS JetStream (extra ``nats``): a transaction log with optimistic concurrency, replicated in memory."""

from ._backend import NatsBackend as NatsBackend

__all__ = ("NatsBackend",)
