"""`gptoss eval`: perplexity, bits per byte and top-1 accuracy of trained runs on any text.

text.py       the documents to score (the same readers as training)
score.py      strided windows over token sequences -> summed loss, correct guesses, counts
evaluator.py  several runs or checkpoints on the same text, results saved to RUN/eval/
"""
