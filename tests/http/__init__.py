"""Tests of the HTTP edge: auth, malformed and hostile requests, the OpenAPI schema."""
