"""The CLIP model: what a spec names and its identity (``spec``), building it with open_clip (``build``), and
encoding with it (``encoder``). Import from the submodules; nothing heavy is imported here."""
