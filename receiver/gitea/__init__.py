"""Gitea: push payload models and the commit status client."""
