"""The flow, the second stage: when a request may go. Every limit it needs (admission's stores), a place in
its queue (priority classes, per-tenant fairness) and a slot, handed out by one gate per named queue.
The limiter stores and their maths are a sibling package below this one (proxy/admission)."""
