"""`gpt2lab serve`: OpenAI-compatible completions and chat completions over HTTP, decoded in batches,
with a web playground.

A request passes app.py (routes, server-sent events), protocol.py (its checks and response shapes; chat.py
for chat completions) and engine.py (the scheduler: sequences join and leave the running batch between
decode steps) to batch.py (one KV cache for every running sequence); text.py holds back stop strings,
server.py runs uvicorn.
"""
