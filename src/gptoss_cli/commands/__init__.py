"""One thin module per CLI command: parse options, call one core function, print the result."""
