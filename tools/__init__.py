"""Corpus builders: multi-domain corpora made offline from this machine's own files, for
comparisons beyond the embedded default (`make system-corpus`, `make lang-corpus`)."""
