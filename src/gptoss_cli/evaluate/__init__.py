"""`gptoss eval`: perplexity, bits per byte and top-1 accuracy of trained runs on any text, and
lm-evaluation-harness tasks on the same runs (--tasks).

text.py           the documents to score (the same readers as training)
score.py          strided windows over token sequences -> summed loss, correct guesses, counts
evaluator.py      several runs or checkpoints on the same text, results saved to RUN/eval/
loglikelihood.py  per-token log-probabilities of token sequences, batched (what the tasks are scored with)
harness_lm.py     a loaded run as an lm-eval model (log-likelihood, rolling log-likelihood, generation)
harness.py        lm-eval tasks on several runs or checkpoints, results saved to RUN/eval/tasks/
view.py           progress and the result tables on stderr
"""
