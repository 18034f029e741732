"""Entry point mirroring the documented ``artifex.generative_models`` layout."""
