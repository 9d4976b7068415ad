"""Errors a user caused: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input: the message names the input, the value, and what is allowed."""
