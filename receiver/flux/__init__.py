"""Typed views of Flux objects, revisions, and the two cluster backends."""
