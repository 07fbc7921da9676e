"""star-serve: a STAR bundle behind OpenAI's chat-completions API (install the `serve` extra).

    star-serve --model BUNDLE --host 127.0.0.1 --port 8000

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    r = client.chat.completions.create(model="star", messages=[{"role": "user", "content": "I feel alone."}])
    r.choices[0].message.content, r.model_extra["star"]["strategy"], r.model_extra["star"]["escalated"]

The modules, each with one job:

    schema.py   OpenAI's request and response objects <-> the runtime's types (no HTTP library)
    worker.py   the bounded queue and the threads that decode, their replies batched per step
    app.py      the HTTP routes, keys, limits, streaming (Starlette)
    cli.py      the star-serve command (uvicorn): options, port, loading, graceful shutdown
    ready.py    waiting for a started server's /health (standard library only: for clients)

The server keeps no conversation state: each request carries its history, which is rebuilt with
`Runtime.conversation(history=...)` (star_runtime.conversation, "History") and checked by the
same safety layer. Only app.py and cli.py import the server libraries; the runtime-only install
does not have them. docs/serve.md has the API, the options and client examples.
"""
