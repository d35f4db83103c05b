"""The method in PyTorch: data sets and protocols, backbones, side-info model, forward transformation, losses,
training loops."""
