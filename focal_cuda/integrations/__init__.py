"""Drop-in integrations with detection frameworks (torchvision; mmdet-style usage is documented in the README)."""
