"""ftune: fine-tune large language models from YAML recipes in far less GPU memory."""

__version__ = "0.1.0"
