"""Model references, the built-in aliases and their conversion from GGUF files, and loading."""
