"""The upstream side: dispatch (deployment choice, retries, fallbacks, breakers), one attempt over a pooled
connection (client), what an attempt sends (outgoing, headers), and the pure decisions they use."""
