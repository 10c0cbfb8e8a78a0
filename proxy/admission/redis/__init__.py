"""The Redis limiter store, for replicas that share limits (`state: redis` in the policy).

    store       RedisStore: the LimiterStore interface over Lua scripts, falling back to local limits
    scripts     the Lua scripts (acquire, adjust, leases, snapshot) and how they are loaded
    codec       keys, arguments and replies of the scripts; pure
    client      the connection (URL parsing without echoing credentials, timeouts)
    health      round-trip health, the late and failed call counts, the circuit's state
    keeper      the background task: lease renewal, reconnects, the breaker's half-open probe
    failopen    what this replica admitted locally while Redis could not decide, reconciled later
    degrade     pure: the store's circuit breaker and a replica's local share of a limit
"""
