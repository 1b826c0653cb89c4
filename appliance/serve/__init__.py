"""Serving: the inference engine (the only llama_cpp import) and, later, the HTTP API."""
