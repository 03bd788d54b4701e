"""llama.cpp's GGUF files, read and written with ggml's own `gguf` package.

    archs.py    llama.cpp's architectures as data: tensor names, what its converter does to them, rope order
    reading.py  GGUFFile (a TensorReader), metadata -> litgpt config, GGUF names -> litgpt names
    writing.py  litgpt names -> GGUF names, litgpt config -> metadata, a streaming GGUF writer
    format.py   the registry's Format: inspect, verify, convert from and to GGUF
"""
