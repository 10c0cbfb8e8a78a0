"""The response cache (`cache:` on a route): whole answers, and embeddings per input.

    serve    ResponseCache.serve(call): hit, miss or bypass on the data path; single flight
    inputs   the per-input embeddings cache (only the missing inputs go upstream)
    rules    pure: the key, Cache-Control (client and upstream), the headers an entry keeps
    answer   the response side: what may be stored, a hit's replayed response
    entry    an entry's bytes (the same in memory and in Redis)
    flight   single flight: identical concurrent misses wait for the first one's answer
    memory   the in-memory store, LRU bounded by bytes (the default)
    shared   the Redis store (with `state.backend: redis`): shared by replicas, an outage is a miss
"""
