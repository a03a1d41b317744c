"""One module per command: each parses options, calls library functions and renders."""
