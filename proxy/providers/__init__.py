"""Wire formats, pure code (no I/O): which translation a request needs (exchange), the Anthropic ⇄ OpenAI
translations (anthropic/), error bodies across protocols (errors_map), `usage` (usage), multipart fields."""
