"""The gateway's OpenAI-compatible HTTPS door: the same guard and pipeline as the gRPC door.

`openai` translates OpenAI's JSON to and from the domain types, `app` is the ASGI application,
`server` serves it on the gateway's event loop (docs/http.md).
"""
