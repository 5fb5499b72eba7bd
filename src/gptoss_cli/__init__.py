"""gptoss: train and run compact gpt-oss-architecture language models."""

__version__ = "0.1.0"
