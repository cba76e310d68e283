"""Llava-1.5 and Llava-NeXT for vistune: model types, loaders, chat templates, LLaVA-Instruct."""
