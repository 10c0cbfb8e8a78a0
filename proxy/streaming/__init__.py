"""The relay: an upstream's answer moved to the client. `relay.respond` is the one entry point; streams go
through the pump, whole bodies through whole.py (see relay.py's docstring for the modules)."""
