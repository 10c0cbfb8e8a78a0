"""Ingress, the first stage: the public handlers, who is calling, the body read once, the route.

    handler     proxy_handler / models_handler and `handle(call)`: THE data path, top to bottom
    identify    the request id, the tenant (API key or trusted header), the route
    read        the body, read once within its size and time limits and parsed once
    models      GET /v1/models, answered from the policy
    edge/       the HTTP connection below the handlers: header clock, JSON answers for malformed HTTP
"""
