"""The version of gradscope (read by the package, the CLI and the run log header)."""

__version__ = "0.1.0"
