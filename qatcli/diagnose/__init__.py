"""Why PTQ fails and QAT recovers: the loss landscape between a full-precision and a quantized point."""
