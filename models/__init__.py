"""Model families over the paged KV cache (one file per family, keyed by HF architecture).

Empty until the engine work lands; the package exists so that ``edgekv.models`` is mapped
from this folder from the start.
"""
