"""Subcommands of the lvit CLI, one module each."""
