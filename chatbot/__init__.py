"""A Meena-style open-domain chatbot: Evolved Transformer seq2seq, sample-and-rank replies."""

__version__ = "0.1.0"
