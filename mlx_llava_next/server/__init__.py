"""`cli.py serve`: an OpenAI-compatible chat-completions server with a browser chat page."""
