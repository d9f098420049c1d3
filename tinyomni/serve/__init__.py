"""Serving: a continuous-batching engine, an OpenAI-compatible HTTP server and a web chat page."""
