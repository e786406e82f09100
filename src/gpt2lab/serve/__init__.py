"""`gpt2lab serve`: OpenAI-compatible completions over HTTP, decoded in batches, with a web playground.

batch.py     the slot pool (one KV cache for every running sequence) and the batched decode step
engine.py    the scheduler: sequences join and leave the running batch between decode steps
protocol.py  the completions request and response shapes, and their validation
app.py       the FastAPI app: routes, server-sent events, API key, errors in OpenAI's shape
static/      the playground page, plain HTML, CSS and JS
"""
