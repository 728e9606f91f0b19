"""The service's HTTP and websocket routes, one router per resource.

`sessions` (create, list, read, end, the WebRTC offer), `audio` (the audio websocket), `ops`
(/healthz, /metrics) and `page` (the browser page and what it loads: /v1/config, reference
images, sample audio). Routers hold no state of their own: the settings, metrics, executor and
session manager live on `app.state` (see stream/app.py) and reach handlers through
stream.routes.deps.
"""
