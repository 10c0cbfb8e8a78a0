"""Admission's stores and maths: how much of each limit is left. Pure window and decision maths, the
in-memory store, token accounting, and the Redis store for replicas (redis/). The flow (proxy/flow)
decides when a request goes and asks these stores; nothing here knows of queues, dispatch or the relay."""
