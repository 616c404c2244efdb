"""The HTTP layer over ``search_api.service``: the FastAPI app, typed dependencies, thin routes, the
request/response schemas, the one problem+json error map, middleware, uploads and the web page."""
