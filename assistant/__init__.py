"""The runtime: model loading, chat rendering, generation and batching."""

from assistant.optional import hold_back_bitsandbytes

# Every entry point imports this package before peft, which would import bitsandbytes (and print its CPU
# warning) even when nothing is quantized; 8/4-bit loading brings it back (assistant.optional).
hold_back_bitsandbytes()
