"""The package version, read by the build backend (hatch) and by ``zimage_turbo.__version__``."""

# Unreleased work is a .devN of the next version, so that a pin on a release never matches it.
__version__ = "0.3.0.dev0"
