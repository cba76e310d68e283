"""The built-in adapters (registered in :mod:`vistune.default_plugins.adapters`).

``lora``   LoRA, DoRA and QLoRA through peft, and merging for export.
``full``   full fine-tuning with per-part freezing.
``galore`` full-rank training with GaLore's projected optimizer.
``targets`` which modules LoRA adapts and which parameters each model part owns.
"""
