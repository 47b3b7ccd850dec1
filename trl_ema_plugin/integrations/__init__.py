"""Thin glue between the averaging core and the training frameworks (TRL, DeepSpeed, Axolotl)."""
