"""Errors a user caused: the CLI prints them as one line and exits with code 2."""

import argparse


class UserError(Exception):
    """Bad input: the message names the input, the value, and what is allowed."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors (a flag's bad value, a missing argument) are a UserError: one line, exit code 2,
    instead of the usage block."""

    def error(self, message):
        raise UserError(f"{self.prog.removeprefix('vdit-sparse ')}: {message}; see --help")


def argument_parser(**kwargs) -> OneLineParser:
    """An ``argparse.ArgumentParser`` whose errors are one line (see ``OneLineParser``)."""
    return OneLineParser(**kwargs)
