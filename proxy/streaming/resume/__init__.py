"""Resumable streams (docs/apps/resumable-streams.md): events numbered and kept in a bounded buffer per
stream (ring.py; mirrored to Redis Streams with the Redis state backend, redis_events.py), a generation
that outlives its client (produce.py), readers that attach from an id (follow.py), and the entry points
from the data path (entry.py) and the Responses API (responses.py)."""
