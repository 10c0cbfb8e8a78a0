"""Anthropic Messages ⇄ OpenAI chat, pure code over parsed JSON (no I/O).

Named by direction, seen from the Anthropic side. `*_to` / `*_from`: Anthropic is the upstream
(an OpenAI client's request goes to it, its answer comes from it). `front_*`: Anthropic is the
front, the protocol the client speaks, and the upstream is OpenAI-compatible.

    request_to      OpenAI chat request        → Anthropic Messages request
    response_from   Anthropic message          → OpenAI chat completion
    stream_from     Anthropic stream events    → OpenAI chat.completion.chunk frames
    front_request   Anthropic Messages request → OpenAI chat request
    front_response  OpenAI chat completion     → Anthropic message
    front_stream    OpenAI chunk frames        → Anthropic stream events
    fields          what both directions share: stop/finish reasons, usage, ids, tool arguments
"""
