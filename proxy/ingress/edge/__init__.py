"""The client-facing edge of the HTTP server, below the handlers: how long a client may take to send a
request (head, body) or sit idle, and the JSON answers for what never reaches a handler (malformed HTTP,
paths the proxy does not serve).

    timeouts    ClientTimeouts (the serve settings) and the timed body read ingress uses
    answers     pure: which ProxyError and which protocol for a parser failure, a timeout, an unknown path
    exact       the server's request handler: paths the router always answers the same way, past it
    connection  GuardedHandler / GuardedServer / GuardedRunner: aiohttp's connection protocol with the
                header clock and those answers
"""
