"""Conversations: the format (format.py, the only module that knows it), opening a run to chat (open.py) and
the chat loop (session.py)."""
