"""Command-line tools: ``ema-export`` (and ``axolotl ema-export`` through Axolotl's plugin commands)."""
