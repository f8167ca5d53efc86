"""Fault suite: every failure scenario of issue 6, end to end through the CLI."""
