"""Head-to-head comparison of SoKA with LoRA, PiSSA and LoKr (see ``benchmarks/compare.py``)."""
