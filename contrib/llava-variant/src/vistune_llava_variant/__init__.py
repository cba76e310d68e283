"""A Llava variant for vistune: image features from two vision layers, through a widened projector."""
