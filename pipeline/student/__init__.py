"""Stage 3 (train-student): students trained from streamed (replayed view, cached row) pairs."""
