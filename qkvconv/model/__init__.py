"""Facts and pure algebra about models: QKV row orders and permutations, rotary orders, LoRA algebra,
tensor comparisons. No file I/O; imports nothing above it."""
