"""The package version (one place: the package, its files and the command line read it)."""
__version__ = "0.1.0"
