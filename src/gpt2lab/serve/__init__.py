"""`gpt2lab serve`: OpenAI-compatible completions over HTTP, decoded in batches, with a web playground.

batch.py     the slot pool (one KV cache for every running sequence) and the batched decode step
engine.py    the scheduler: sequences join and leave the running batch between decode steps
text.py      what a sequence sends: stop strings held back, each token's text offset
protocol.py  the completions request and response shapes, and their validation
app.py       the FastAPI app: routes, server-sent events, API key, errors in OpenAI's shape
server.py    loading the models into an engine, and running the app with uvicorn
static/      the playground page, plain HTML, CSS and JS
"""
