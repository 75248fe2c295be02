"""Evaluation: perplexity by the GPTQ protocol, lm-evaluation-harness tasks, and the chunked output head both use."""
