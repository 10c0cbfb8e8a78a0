"""Embeddings batching: concurrent calls with the same key share one upstream call.

    batcher     the open groups by key: join, seal (full or max_wait), leave, close at shutdown
    flush       a sealed group's upstream call: merge, dispatch, split back, bisect a 400-class answer
    keys        pure: who may share an upstream call (the group key) and how many inputs each brings
    merge       pure: inputs merged, answers split back, usage apportioned, failures bisected
"""
