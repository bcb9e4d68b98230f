"""The package version (its own module, so that the modules that record it import nothing above them)."""

__version__ = "0.1.0"
