"""qatcli: quantize Hugging Face causal LMs to 2-8 bits and measure what each method costs."""

__version__ = "0.1.0"
