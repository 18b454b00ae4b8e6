"""dbnet: DBNet and DBNet++ text detection, from data to deployment."""

__version__ = "0.1.0"
