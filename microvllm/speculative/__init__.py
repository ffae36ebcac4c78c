"""Speculative decoding: proposers that guess a sequence's next tokens, checked by the
target model in the same step (see proposer.py)."""
