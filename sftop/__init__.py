"""sftop: fine-tune LLMs and VLMs from a terminal."""

__version__ = "0.1.0"
