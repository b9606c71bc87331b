"""Tests of the pictures: plots, the render cache, the picture routes and the dashboard."""
