"""Cross-tokenizer alignment."""
