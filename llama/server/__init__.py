"""An OpenAI- and llama.cpp-compatible HTTP server over the engine (`python -m llama.server`).

The server only translates: HTTP requests become prompts and engine parameters, engine events
become JSON responses or server-sent events. Scheduling and generation are the engine's.
"""
