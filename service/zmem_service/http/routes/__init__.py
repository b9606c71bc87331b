"""Thin routers: decode the request, call the service, encode the answer."""
