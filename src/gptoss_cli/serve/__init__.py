"""`gptoss serve`: an OpenAI-compatible HTTP server with streaming and continuous batching."""
