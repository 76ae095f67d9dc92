"""The package version, read by the build backend (hatch) and by ``zimage_turbo.__version__``."""

__version__ = "0.2.0"
