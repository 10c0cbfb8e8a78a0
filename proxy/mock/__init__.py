"""The built-in mock upstream (`provider: mock`, `signalbox mock`): a real aiohttp server speaking the
OpenAI and Anthropic wire formats. `server` runs it; `chat`, `responses`, `messages` and `embeddings`
build each endpoint's bodies and events; `content` and `structured` hold what they share; `faults`
draws the scripted failures and `flags` turns `signalbox mock`'s flags into them. Production code
imports it only where a mock upstream is started (proxy.upstream.client) or the command runs."""
