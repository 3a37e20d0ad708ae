"""Chat sessions saved and loaded.

    io.py      save and load: the conversation's tokens and its quantized KV blocks
    check.py   what a file must hold before anything is changed
    blocks.py  every layer's K/V block tensors, as save and check walk them
"""
