"""Diagnostics (SPEC §6): the seed's criteria and a kernel check (`criteria`), islands (`islands`)."""
