"""`gptoss chat`: opening a run to chat (open.py) and the chat loop (session.py). The conversation format
itself belongs to data/chat_format.py, the only module that knows it."""
