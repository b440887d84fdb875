"""headstart's version: a leaf module, so run files and exports can record it without importing the package."""

__version__ = "0.1.0"
