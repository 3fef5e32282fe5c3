"""Integrations: HF Trainer subclasses, the fused-loss hook for stock trainers, PEFT helpers."""
