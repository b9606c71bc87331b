"""The HTTP edge: the app, its routes, auth, the wire formats, the OpenAPI schema and the server."""
